# otpflow: a go.work workspace; targets loop over its modules.
MODULES := events platform services/issuer services/dispatcher services/verifier services/auditor cmd/otpflow
GO ?= go

.PHONY: build run test test-short bench fuzz lint tidy clean

build:
	$(GO) build -o bin/ ./services/issuer/cmd/issuer ./services/dispatcher/cmd/dispatcher \
		./services/verifier/cmd/verifier ./services/auditor/cmd/auditor ./cmd/otpflow

run: build
	bin/otpflow dev

# The whole suite: real NATS (embedded) and a real PostgreSQL (OTP_TEST_DATABASE_URL,
# default postgres://postgres@127.0.0.1:5432/postgres).
test:
	@set -e; for m in $(MODULES); do echo "== $$m"; (cd $$m && $(GO) test -count=1 -timeout 10m ./...); done
	@$(MAKE) --no-print-directory fuzz FUZZTIME=5s

# Each fuzz target for a short while (go test -fuzz takes one target per run).
FUZZTIME ?= 30s
fuzz:
	@set -e; for f in FuzzDecodeRequested FuzzDecodeVerifyRequest; do \
		echo "== fuzz $$f ($(FUZZTIME))"; (cd events && $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) .); done

bench:
	@set -e; for m in $(MODULES); do (cd $$m && $(GO) test -run '^$$' -bench . -benchmem ./...); done

STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	@set -e; for m in $(MODULES); do (cd $$m && $(GO) vet ./... && $(GO) run $(STATICCHECK) ./...); done

tidy:
	@set -e; for m in $(MODULES); do (cd $$m && GOWORK=off $(GO) mod tidy); done

clean:
	rm -rf bin .otpflow
