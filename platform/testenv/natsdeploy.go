package testenv

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// DeployIdentities are the identities of deploy/nats/nats-server.conf.tmpl: the
// placeholder of its public key ({{<Placeholder>_NKEY}}), and the inbox prefix it connects
// with.
var DeployIdentities = []struct{ ID, Placeholder, Inbox string }{
	{"issuer", "ISSUER", "_INBOX_issuer"},
	{"dispatcher", "DISPATCHER", "_INBOX_dispatcher"},
	{"verifier", "VERIFIER", "_INBOX_verifier"},
	{"auditor", "AUDITOR", "_INBOX_auditor"},
	{"admin", "ADMIN", "_INBOX"},
	{"operator", "OPERATOR", "_INBOX"},
	{"acme", "APP_ACME", "_INBOX_acme"},
	{"globex", "APP_GLOBEX", "_INBOX_globex"},
	{"system", "SYSTEM", "_INBOX"},
}

// DeployJSAPIPrefix is the JetStream API prefix of deploy/nats: every identity's account
// imports the API subjects it may use from OTPFLOW, where the streams are, under it.
const DeployJSAPIPrefix = "JS.OTPFLOW.API"

// NATSDeployment is the server of deploy/nats, rendered with keys and a CA made for the
// test, running embedded over TLS.
type NATSDeployment struct {
	Server *server.Server
	URL    string
	CA     *CA
	Seeds  map[string]string // identity -> seed file (OTP_NATS_NKEY_FILE)
	Pubs   map[string]string // identity -> public nkey
}

// DeployedNATS renders deploy/nats/nats-server.conf.tmpl with keys and a CA made for the
// test and starts it embedded, over TLS, on a free loopback port.
func DeployedNATS(t testing.TB) *NATSDeployment {
	t.Helper()
	tmpl, err := os.ReadFile(DeployNATSTemplate())
	Must(t, err, "read the template")
	ca := NewCA(t, "otpflow test CA")
	cert, key := ca.Issue(t, "nats-server")
	d := &NATSDeployment{CA: ca, Seeds: map[string]string{}, Pubs: map[string]string{}}
	keyDir := t.TempDir()
	pairs := []string{
		"{{SERVER_NAME}}", "otpflow-test", "{{LISTEN}}", "127.0.0.1:-1", "{{MONITOR}}", "127.0.0.1:-1", "{{STORE_DIR}}", t.TempDir(),
		"{{TLS_CERT}}", cert, "{{TLS_KEY}}", key, "{{TLS_CA}}", ca.File, "{{TLS_VERIFY}}", "false",
	}
	for _, id := range DeployIdentities {
		kp, err := nkeys.CreateUser()
		Must(t, err, "nkey")
		seed, err := kp.Seed()
		Must(t, err, "seed")
		pub, err := kp.PublicKey()
		Must(t, err, "public key")
		d.Seeds[id.ID], d.Pubs[id.ID] = filepath.Join(keyDir, id.ID+".seed"), pub
		Must(t, os.WriteFile(d.Seeds[id.ID], seed, 0o600), "write seed")
		pairs = append(pairs, "{{"+id.Placeholder+"_NKEY}}", pub)
	}
	conf := strings.NewReplacer(pairs...).Replace(string(tmpl))
	if i := strings.Index(conf, "{{"); i >= 0 {
		t.Fatalf("the template has a placeholder the test does not fill: %.40s", conf[i:])
	}
	file := filepath.Join(t.TempDir(), "nats-server.conf")
	Must(t, os.WriteFile(file, []byte(conf), 0o600), "write config")
	opts, err := server.ProcessConfigFile(file)
	Must(t, err, "the rendered configuration")
	opts.NoLog, opts.NoSigs = true, true
	s, err := server.NewServer(opts)
	Must(t, err, "nats server")
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	d.Server, d.URL = s, s.ClientURL()
	return d
}

// Common is the configuration of a process that connects as identity id.
func (d *NATSDeployment) Common(id string) platform.Common {
	return platform.Common{NATSURL: d.URL, NATSNkeyFile: d.Seeds[id], NATSTLSCA: d.CA.File, NATSJSAPIPrefix: DeployJSAPIPrefix,
		Env: platform.EnvDevelopment, Replicas: 1, RequestsMaxAge: events.DefaultRequestsMaxAge}
}

// DeployNATSTemplate is the path of deploy/nats/nats-server.conf.tmpl in this checkout.
func DeployNATSTemplate() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "deploy", "nats", "nats-server.conf.tmpl")
}
