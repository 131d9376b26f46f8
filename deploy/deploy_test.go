package deploy

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

// The checks read the deployment files as one set of contents keyed by their path under
// deploy/ (and "../Makefile", "../go.work" for the Dockerfile's), so that
// TestChecksCatchBreakage can break a copy and see the check fail.
type files map[string]string

func loadFiles(tb testing.TB) files {
	tb.Helper()
	f := files{}
	paths := []string{"Dockerfile", "compose.yaml", "README.md", "dev-secrets.sh", "../Makefile", "../go.work",
		"aws/dispatcher-policy.json", "aws/feedback-queue-policy.json", "aws/sns-topic-policy.json", "aws/ses-event-destination.json"}
	k8s, err := filepath.Glob("k8s/*.yaml")
	if err != nil {
		tb.Fatal(err)
	}
	if len(k8s) == 0 {
		tb.Fatal("no manifests in deploy/k8s")
	}
	for _, p := range append(paths, k8s...) {
		b, err := os.ReadFile(p)
		if err != nil {
			tb.Fatal(err)
		}
		f[filepath.ToSlash(p)] = string(b)
	}
	return f
}

// with returns a copy of f in which old is replaced by new in the file named path; the
// breakage table uses it. It fails the test when old is not there, so that a table entry
// that no longer breaks anything is noticed.
func (f files) with(tb testing.TB, path, old, new string) files {
	tb.Helper()
	if !strings.Contains(f[path], old) {
		tb.Fatalf("%s does not contain %q", path, old)
	}
	g := make(files, len(f))
	for k, v := range f {
		g[k] = v
	}
	g[path] = strings.Replace(f[path], old, new, 1)
	return g
}

// report fails t with every error of errs, one line each.
func report(t *testing.T, errs []error) {
	t.Helper()
	for _, err := range errs {
		t.Error(err)
	}
}

// The binaries in the image, as a container's command names them.
var services = []string{"issuer", "dispatcher", "verifier", "auditor"}

const cli = "otpflow"

// The image's numeric user: distroless's nonroot.
const imageUID = 65532

// envNamePattern finds variable names in the Go sources: a string literal that is a name
// and nothing else ("OTP_SEAL_KEY", not "OTP_" + x).
var envNamePattern = regexp.MustCompile(`"((?:OTP|OTEL|AWS)_[A-Z0-9_]+)"`)

// pendingEnv are variables that the deployment files set for a change arriving beside
// this one (issue 11: deploy/nats gives each service an nkey seed file). A name here that
// the sources already read is simply read; it never widens what a check accepts beyond it.
var pendingEnv []string

// envReadBy returns the variables that binary may read: the names in the non-test Go
// sources of platform (without its test-only modules) and of the binary's own module; the
// CLI links every service, so it reads theirs too.
func envReadBy(tb testing.TB, binary string) map[string]bool {
	tb.Helper()
	dirs := []string{"../platform"}
	switch binary {
	case cli:
		dirs = append(dirs, "../cmd/otpflow", "../services")
	default:
		dirs = append(dirs, "../services/"+binary)
	}
	names := map[string]bool{}
	for _, n := range pendingEnv {
		names[n] = true
	}
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && (path == "../platform/testenv" || path == "../platform/integration" || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			for _, m := range envNamePattern.FindAllStringSubmatch(string(b), -1) {
				names[m[1]] = true
			}
			return nil
		})
		if err != nil {
			tb.Fatal(err)
		}
	}
	if len(names) < 20 {
		tb.Fatalf("found only %d variable names under %v; has the code moved?", len(names), dirs)
	}
	return names
}

// envCatalog is envReadBy for every binary.
type envCatalog map[string]map[string]bool

// code is what the checks take from the Go sources: the variables each binary reads and
// the names of the dispatcher's stream and consumer in the contract.
type code struct {
	env                              envCatalog
	dispatchStream, dispatchConsumer string
}

func readCode(tb testing.TB) *code {
	tb.Helper()
	c := &code{env: envCatalog{},
		dispatchStream:   eventsConst(tb, "StreamDispatch"),
		dispatchConsumer: eventsConst(tb, "ConsumerDispatcher")}
	for _, b := range append(slices.Clone(services), cli) {
		c.env[b] = envReadBy(tb, b)
	}
	return c
}

// unknown returns the names in env that binary does not read, sorted.
func (c envCatalog) unknown(binary string, env []string) []string {
	read, ok := c[binary]
	if !ok {
		return []string{"(no such binary " + binary + ")"}
	}
	var out []string
	for _, n := range env {
		if !read[n] {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// requiredEnv are the variables without which a service stops at start (its config.go),
// besides the connections every service needs.
var requiredEnv = map[string][]string{
	"issuer":     {"OTP_CODE_PEPPER", "OTP_SEAL_KEY", "OTP_SUBJECT_KEY", "OTP_DLQ_KEY"},
	"dispatcher": {"OTP_SEAL_KEY", "OTP_SUBJECT_KEY", "OTP_DLQ_KEY", "OTP_PROVIDERS", "OTP_MAIL_FROM"},
	"verifier":   {"OTP_CODE_PEPPER", "OTP_SUBJECT_KEY", "OTP_DLQ_KEY"},
	"auditor":    {"OTP_SUBJECT_KEY", "OTP_DLQ_KEY", "OTP_AUDIT_KEY", "OTP_AUDIT_CHAIN_KEY", "OTP_AUDIT_SIGNING_KEY"},
}

// connectionEnv every service needs set in a deployment (the defaults are a laptop's).
var connectionEnv = []string{"OTP_ENV", "OTP_NATS_URL", "OTP_DATABASE_URL", "OTP_HTTP_ADDR"}

// secretEnv are the keys: they may come only from a secret store (compose: deploy/.env
// interpolation; Kubernetes: a secretKeyRef), never a value written in a file here.
var secretEnv = []string{"OTP_CODE_PEPPER", "OTP_SEAL_KEY", "OTP_SUBJECT_KEY", "OTP_DLQ_KEY",
	"OTP_AUDIT_KEY", "OTP_AUDIT_CHAIN_KEY", "OTP_AUDIT_SIGNING_KEY", "OTP_MIGRATE_DATABASE_URL"}

// eventsConst returns the value of the string constant name in the events package, the
// contract the KEDA trigger must name.
func eventsConst(tb testing.TB, name string) string {
	tb.Helper()
	srcs, err := filepath.Glob("../events/*.go")
	if err != nil {
		tb.Fatal(err)
	}
	re := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(name) + `\s*=\s*"([^"]+)"`)
	for _, p := range srcs {
		b, err := os.ReadFile(p)
		if err != nil {
			tb.Fatal(err)
		}
		if m := re.FindSubmatch(b); m != nil {
			return string(m[1])
		}
	}
	tb.Fatalf("events declares no constant %s", name)
	return ""
}

// errorf is fmt.Errorf under a shorter name for the many checks below.
func errorf(format string, args ...any) error { return fmt.Errorf(format, args...) }
