# otpflow: a go.work workspace; targets loop over its modules.
MODULES := events platform platform/integration platform/testenv services/issuer services/dispatcher services/verifier services/auditor cmd/otpflow deploy deploy/prometheus chaos
GO ?= go

# Every target builds and tests with the patched toolchain (go1.26.8 has reachable net/http and
# crypto/x509 vulnerabilities). It is exported rather than put in go.mod because our machines
# set GOTOOLCHAIN=local, which ignores a toolchain line. The go command fetches it through the
# module proxy on first use. Do not override it for a build that ships: go1.26.8 binaries
# carry the vulnerabilities `make vuln VULN_TOOLCHAIN=local` shows.
export GOTOOLCHAIN := go1.27.3

.PHONY: build run test test-short bench fuzz lint tidy clean vuln chaos

# Stamp the git revision into the binaries (the verifier reports it as its version); go's
# default stamps only a module at the repository's root. Off outside a git checkout.
BUILDVCS := $(if $(wildcard .git),true,false)

build:
	$(GO) build -buildvcs=$(BUILDVCS) -o bin/ ./services/issuer/cmd/issuer ./services/dispatcher/cmd/dispatcher \
		./services/verifier/cmd/verifier ./services/auditor/cmd/auditor ./cmd/otpflow

run: build
	bin/otpflow dev

# The whole suite: real NATS (embedded) and a real PostgreSQL (OTP_TEST_DATABASE_URL,
# default postgres://postgres@127.0.0.1:5432/postgres).
test:
	@set -e; for m in $(MODULES); do echo "== $$m"; (cd $$m && $(GO) test -count=1 -timeout 10m ./...); done
	@$(MAKE) --no-print-directory fuzz FUZZTIME=5s

# The fault suite (chaos/, docs/reliability.md): every scenario against the real binaries
# as processes, a nats-server built from the pinned module, and a private PostgreSQL
# cluster; prints the table at the end. About twelve minutes. `make test` runs its short
# version. CHAOS_RUN picks scenarios by a regular expression on their names;
# CHAOS_REPORT names a file for the table in Markdown.
CHAOS_RUN ?=
CHAOS_REPORT ?=
chaos:
	cd chaos && OTP_CHAOS=1 OTP_CHAOS_RUN='$(CHAOS_RUN)' OTP_CHAOS_REPORT='$(if $(CHAOS_REPORT),$(abspath $(CHAOS_REPORT)))' \
		$(GO) test -count=1 -timeout 90m -run '^TestChaos$$' -v .

# Each fuzz target for a short while (go test -fuzz takes one target per run).
FUZZTIME ?= 30s
fuzz:
	@set -e; for f in FuzzDecodeRequested FuzzDecodeVerifyRequest FuzzDecodeStatusRequest FuzzDecodeDispatch FuzzRedactAddresses; do \
		echo "== fuzz $$f ($(FUZZTIME))"; (cd events && $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) .); done
	@echo "== fuzz FuzzDecodeErasure ($(FUZZTIME))"; cd platform/integration && $(GO) test -run '^$$' -fuzz '^FuzzDecodeErasure$$' -fuzztime $(FUZZTIME) .
	@echo "== fuzz FuzzToRow, audit rows ($(FUZZTIME))"; cd services/auditor && $(GO) test -run '^$$' -fuzz '^FuzzToRow$$' -fuzztime $(FUZZTIME) .
	@set -e; for f in FuzzParse FuzzDiagnostic FuzzVerify; do \
		echo "== fuzz $$f, SES notifications ($(FUZZTIME))"; (cd services/dispatcher/sesfeedback && $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) .); done

bench:
	@set -e; for m in $(MODULES); do (cd $$m && $(GO) test -run '^$$' -bench . -benchmem ./...); done

STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	@set -e; for m in $(MODULES); do (cd $$m && $(GO) vet ./... && $(GO) run $(STATICCHECK) ./...); done

# Reachable vulnerabilities (govulncheck, symbol level) in every module, against a database
# built offline from golang.org/x/vulndb and cached; see .ci/vuln.sh. Fails on a finding.
# `make vuln VULN_TOOLCHAIN=local` scans against the machine's own Go instead, to see it fail.
vuln:
	@GO="$(GO)" bash .ci/vuln.sh $(MODULES)

tidy:
	@set -e; for m in $(MODULES); do (cd $$m && GOWORK=off $(GO) mod tidy); done

clean:
	rm -rf bin .otpflow
