package deploy

import (
	"net"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

type composeFile struct {
	Services map[string]composeService
}

type composeService struct {
	Image string
	Build *struct {
		Context    string
		Dockerfile string
	}
	User        string
	ReadOnly    bool `yaml:"read_only"`
	Command     []string
	Environment map[string]string
	DependsOn   map[string]struct{ Condition string } `yaml:"depends_on"`
	Healthcheck *struct{ Test []string }
	Restart     string
	Volumes     []string
}

// The compose services that run an otpflow binary, and the one-shot provisioning job.
const composeProvision = "provision"

func TestCompose(t *testing.T) {
	report(t, checkCompose(loadFiles(t), readCode(t)))
}

// checkCompose checks deploy/compose.yaml: the images, health checks, start order,
// non-root users, development mode, each service's own database role, and that every
// variable set on an otpflow container is one its binary reads.
func checkCompose(f files, src *code) []error {
	var c composeFile
	if err := yaml.Unmarshal([]byte(f["compose.yaml"]), &c); err != nil {
		return []error{errorf("compose.yaml: %v", err)}
	}
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, errorf("compose.yaml: "+format, args...)) }

	infra := map[string]string{"nats": "nats:", "postgres": "postgres:", "mailpit": "axllent/mailpit:"}
	for name, prefix := range infra {
		s, ok := c.Services[name]
		if !ok {
			fail("no service %s", name)
			continue
		}
		if !strings.HasPrefix(s.Image, prefix) || pinnedTag(s.Image) == "" {
			fail("%s: image %q is not %s<pinned tag>", name, s.Image, prefix)
		}
		if s.Healthcheck == nil || len(s.Healthcheck.Test) == 0 {
			fail("%s: no healthcheck", name)
		}
	}
	if s := c.Services["nats"]; s.Healthcheck != nil {
		if !slices.Contains(s.Command, "--jetstream") && !slices.Contains(s.Command, "-js") {
			fail("nats: JetStream is off (no --jetstream in its command)")
		}
		if dir := flagValue(s.Command, "--store_dir", "-sd"); dir == "" || !hasVolumeAt(s.Volumes, dir) {
			fail("nats: the JetStream store (--store_dir %q) is not on a volume", dir)
		}
		if port := flagValue(s.Command, "--http_port", "-m"); port == "" || !strings.Contains(strings.Join(s.Healthcheck.Test, " "), ":"+port+"/healthz") {
			fail("nats: the healthcheck does not ask the monitoring port (--http_port %q) for /healthz", port)
		}
	}
	if s := c.Services["postgres"]; s.Healthcheck != nil && !slices.Contains(s.Healthcheck.Test, "pg_isready") {
		fail("postgres: the healthcheck is not pg_isready")
	}

	p, ok := c.Services[composeProvision]
	if !ok {
		fail("no service %s", composeProvision)
	}
	if !slices.Equal(p.Command, []string{cli, "provision"}) {
		fail("%s: command %q is not [otpflow provision]", composeProvision, p.Command)
	}
	if p.Restart != "" && p.Restart != "no" {
		fail("%s: restart %q would rerun a one-shot job; want \"no\"", composeProvision, p.Restart)
	}
	for _, dep := range []string{"nats", "postgres"} {
		if cond := p.DependsOn[dep].Condition; cond != "service_healthy" {
			fail("%s: depends on %s with condition %q, want service_healthy", composeProvision, dep, cond)
		}
	}

	for _, name := range append(slices.Clone(services), composeProvision) {
		s, ok := c.Services[name]
		if !ok {
			fail("no service %s", name)
			continue
		}
		binary := name
		if name == composeProvision {
			binary = cli
		} else if len(s.Command) == 0 || s.Command[0] != name {
			fail("%s: command %q does not run the %s binary", name, s.Command, name)
		}
		if s.Image != c.Services["issuer"].Image || s.Build == nil || s.Build.Dockerfile != "deploy/Dockerfile" || s.Build.Context != ".." {
			fail("%s: not the otpflow image built from deploy/Dockerfile (image %q)", name, s.Image)
		}
		if uid, err := strconv.Atoi(strings.Split(s.User, ":")[0]); err != nil || uid == 0 {
			fail("%s: user %q is not a numeric non-root UID", name, s.User)
		}
		if !s.ReadOnly {
			fail("%s: root file system is writable (read_only: true)", name)
		}
		names := make([]string, 0, len(s.Environment))
		for n := range s.Environment {
			names = append(names, n)
		}
		if u := src.env.unknown(binary, names); len(u) > 0 {
			fail("%s: sets %v, which the %s binary does not read", name, u, binary)
		}
		if s.Environment["OTP_ENV"] != "development" {
			fail("%s: OTP_ENV is %q, want development", name, s.Environment["OTP_ENV"])
		}
		for _, n := range secretEnv {
			if v, ok := s.Environment[n]; ok && !strings.HasPrefix(v, "${"+n) && !strings.Contains(v, "${POSTGRES_PASSWORD}") {
				fail("%s: %s is written in the file; take it from deploy/.env (${%s:?…})", name, n, n)
			}
		}
		if name == composeProvision {
			continue
		}
		for _, n := range append(slices.Clone(connectionEnv), requiredEnv[name]...) {
			if s.Environment[n] == "" {
				fail("%s: %s is not set", name, n)
			}
		}
		if u, err := url.Parse(s.Environment["OTP_DATABASE_URL"]); err != nil || u.User.Username() != "otpflow_"+name {
			fail("%s: OTP_DATABASE_URL does not log in as its own role otpflow_%s", name, name)
		}
		for _, dep := range []string{"nats", "postgres"} {
			if cond := s.DependsOn[dep].Condition; cond != "service_healthy" {
				fail("%s: depends on %s with condition %q, want service_healthy", name, dep, cond)
			}
		}
		if cond := s.DependsOn[composeProvision].Condition; cond != "service_completed_successfully" {
			fail("%s: depends on %s with condition %q, want service_completed_successfully", name, composeProvision, cond)
		}
		checkServiceHealth(name, s, fail)
	}

	d := c.Services["dispatcher"]
	if d.Environment["OTP_PROVIDERS"] != "smtp" {
		fail("dispatcher: OTP_PROVIDERS is %q, want smtp (to Mailpit)", d.Environment["OTP_PROVIDERS"])
	}
	if u, err := url.Parse(d.Environment["OTP_SMTP_URL"]); err != nil || u.Hostname() != "mailpit" || u.Query().Get("tls") != "none" {
		fail("dispatcher: OTP_SMTP_URL %q is not smtp://mailpit:…?tls=none", d.Environment["OTP_SMTP_URL"])
	}
	if cond := d.DependsOn["mailpit"].Condition; cond != "service_healthy" {
		fail("dispatcher: depends on mailpit with condition %q, want service_healthy", cond)
	}
	errs = append(errs, checkDevSecrets(f)...)
	return errs
}

// checkServiceHealth checks that the health check asks the service's own OTP_HTTP_ADDR
// port for /healthz or /readyz.
func checkServiceHealth(name string, s composeService, fail func(string, ...any)) {
	if s.Healthcheck == nil || len(s.Healthcheck.Test) == 0 {
		fail("%s: no healthcheck", name)
		return
	}
	_, port, err := net.SplitHostPort(s.Environment["OTP_HTTP_ADDR"])
	if err != nil || port == "" {
		fail("%s: OTP_HTTP_ADDR %q names no port", name, s.Environment["OTP_HTTP_ADDR"])
		return
	}
	test := strings.Join(s.Healthcheck.Test, " ")
	if !regexp.MustCompile(`http://(127\.0\.0\.1|localhost):` + port + `/(healthz|readyz)\b`).MatchString(test) {
		fail("%s: healthcheck %q does not ask port %s (OTP_HTTP_ADDR) for /healthz or /readyz", name, test, port)
	}
}

// checkDevSecrets checks that deploy/dev-secrets.sh writes every variable compose.yaml
// takes from deploy/.env, each key as a "devfake" id.
func checkDevSecrets(f files) []error {
	var errs []error
	written := map[string]string{}
	for _, m := range regexp.MustCompile(`(?m)^echo "([A-Z_]+)=(.*)"$`).FindAllStringSubmatch(f["dev-secrets.sh"], -1) {
		written[m[1]] = m[2]
	}
	for _, m := range regexp.MustCompile(`\$\{([A-Z_]+)`).FindAllStringSubmatch(f["compose.yaml"], -1) {
		if _, ok := written[m[1]]; !ok {
			errs = append(errs, errorf("compose.yaml: takes ${%s} from deploy/.env, which dev-secrets.sh does not write", m[1]))
		}
	}
	for name, v := range written {
		if strings.HasPrefix(name, "OTP_") && !strings.HasPrefix(v, "$(key devfake-") {
			errs = append(errs, errorf("dev-secrets.sh: %s is not a generated devfake key", name))
		}
	}
	return errs
}

// pinnedTag returns the tag of image unless it is missing or latest.
func pinnedTag(image string) string {
	i := strings.LastIndexByte(image, ':')
	if i < 0 || strings.Contains(image[i:], "/") || image[i+1:] == "latest" {
		return ""
	}
	return image[i+1:]
}

// flagValue returns the value after the first of names in args.
func flagValue(args []string, names ...string) string {
	for i, a := range args {
		if slices.Contains(names, a) && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

func hasVolumeAt(volumes []string, dir string) bool {
	for _, v := range volumes {
		if parts := strings.Split(v, ":"); len(parts) >= 2 && parts[1] == dir {
			return true
		}
	}
	return false
}
