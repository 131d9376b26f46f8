package platform_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/otpflow/otpflow/platform/testenv"
)

var deployNATS = filepath.Join("..", "..", "deploy", "nats")

// TestDeployNATSRenderScript: render.sh fills every placeholder of the template from the
// directories make-nkeys.sh and make-certs.sh write, and the server accepts the result.
func TestDeployNATSRenderScript(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh")
	}
	keys, certs := t.TempDir(), testenv.NewCA(t, "otpflow test CA")
	for _, id := range []string{"issuer", "dispatcher", "verifier", "auditor", "admin", "operator", "app_acme", "app_globex", "system"} {
		kp, err := nkeys.CreateUser()
		testenv.Must(t, err, "nkey")
		pub, _ := kp.PublicKey()
		testenv.Must(t, os.WriteFile(filepath.Join(keys, id+".pub"), []byte(pub+"\n"), 0o644), "write")
	}
	certs.Issue(t, "server") // server.pem, server-key.pem beside ca.pem, as make-certs.sh names them
	out, err := exec.Command("sh", filepath.Join(deployNATS, "render.sh"), keys, certs.Dir, t.TempDir(), "127.0.0.1:-1", "render-test").Output()
	testenv.Must(t, err, "render.sh")
	if i := strings.Index(string(out), "{{"); i >= 0 {
		t.Fatalf("render.sh left a placeholder: %.40s", out[i:])
	}
	file := filepath.Join(t.TempDir(), "nats-server.conf")
	testenv.Must(t, os.WriteFile(file, out, 0o600), "write")
	opts, err := server.ProcessConfigFile(file)
	testenv.Must(t, err, "the rendered configuration")
	if opts.TLSConfig == nil || len(opts.Nkeys) != 9 || opts.SystemAccount != "SYS" {
		t.Fatalf("rendered: TLS %v, %d nkey users, system account %q", opts.TLSConfig != nil, len(opts.Nkeys), opts.SystemAccount)
	}
}

var publicUserKey = regexp.MustCompile(`\bU[A-Z2-7]{55}\b`)

// TestDeployNATSExampleIsCurrent: nats-server.conf.example is the template rendered (its
// keys and paths aside), so an edit of the permissions reaches both.
func TestDeployNATSExampleIsCurrent(t *testing.T) {
	tmpl, err := os.ReadFile(filepath.Join(deployNATS, "nats-server.conf.tmpl"))
	testenv.Must(t, err, "template")
	example, err := os.ReadFile(filepath.Join(deployNATS, "nats-server.conf.example"))
	testenv.Must(t, err, "example")
	body := string(example)
	body = body[strings.Index(body, "# otpflow: NATS server"):] // past the example's own header
	body = publicUserKey.ReplaceAllString(body, "{{KEY}}")
	want := regexp.MustCompile(`\{\{[A-Z_]+_NKEY\}\}`).ReplaceAllString(string(tmpl), "{{KEY}}")
	for placeholder, value := range map[string]string{
		"{{SERVER_NAME}}": "otpflow-nats-1", "{{LISTEN}}": "0.0.0.0:4222", "{{MONITOR}}": "0.0.0.0:8222", "{{STORE_DIR}}": "/var/lib/nats/jetstream",
		"{{TLS_CERT}}": "/etc/nats/certs/server.pem", "{{TLS_KEY}}": "/etc/nats/certs/server-key.pem",
		"{{TLS_CA}}": "/etc/nats/certs/ca.pem", "{{TLS_VERIFY}}": "false",
	} {
		want = strings.ReplaceAll(want, placeholder, value)
	}
	if body != want {
		wl, bl := strings.Split(want, "\n"), strings.Split(body, "\n")
		for i := range min(len(wl), len(bl)) {
			if wl[i] != bl[i] {
				t.Fatalf("nats-server.conf.example differs from the template at line %d of the template:\n template: %s\n example:  %s\nrender it again (deploy/nats/README.md)", i+1, wl[i], bl[i])
			}
		}
		t.Fatalf("nats-server.conf.example has %d lines past its header, the template %d", len(bl), len(wl))
	}
}
