package platform_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// The identities of deploy/nats/nats-server.conf.tmpl: placeholder {{<ID>_NKEY}}, and
// the inbox prefix each connects with.
var deployIdentities = []struct{ id, placeholder, inbox string }{
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

// natsDeployment is the server of deploy/nats, rendered with keys and a CA made for the
// test, running embedded over TLS.
type natsDeployment struct {
	Server *server.Server
	URL    string
	CA     *testCA
	Seeds  map[string]string // identity -> seed file (OTP_NATS_NKEY_FILE)
	Pubs   map[string]string // identity -> public nkey
}

// startDeployedNATS renders deploy/nats/nats-server.conf.tmpl and starts it.
func startDeployedNATS(t *testing.T) *natsDeployment {
	t.Helper()
	tmpl, err := os.ReadFile(filepath.Join("..", "..", "deploy", "nats", "nats-server.conf.tmpl"))
	testenv.Must(t, err, "read the template")
	ca := newTestCA(t, "otpflow test CA")
	cert, key := ca.issue(t, "nats-server")
	d := &natsDeployment{CA: ca, Seeds: map[string]string{}, Pubs: map[string]string{}}
	keyDir := t.TempDir()
	pairs := []string{
		"{{SERVER_NAME}}", "otpflow-test", "{{LISTEN}}", "127.0.0.1:-1", "{{STORE_DIR}}", t.TempDir(),
		"{{TLS_CERT}}", cert, "{{TLS_KEY}}", key, "{{TLS_CA}}", ca.File, "{{TLS_VERIFY}}", "false",
	}
	for _, id := range deployIdentities {
		kp, err := nkeys.CreateUser()
		testenv.Must(t, err, "nkey")
		seed, err := kp.Seed()
		testenv.Must(t, err, "seed")
		pub, err := kp.PublicKey()
		testenv.Must(t, err, "public key")
		d.Seeds[id.id], d.Pubs[id.id] = filepath.Join(keyDir, id.id+".seed"), pub
		testenv.Must(t, os.WriteFile(d.Seeds[id.id], seed, 0o600), "write seed")
		pairs = append(pairs, "{{"+id.placeholder+"_NKEY}}", pub)
	}
	conf := strings.NewReplacer(pairs...).Replace(string(tmpl))
	if i := strings.Index(conf, "{{"); i >= 0 {
		t.Fatalf("the template has a placeholder the test does not fill: %.40s", conf[i:])
	}
	file := filepath.Join(t.TempDir(), "nats-server.conf")
	testenv.Must(t, os.WriteFile(file, []byte(conf), 0o600), "write config")
	opts, err := server.ProcessConfigFile(file)
	testenv.Must(t, err, "the rendered configuration")
	opts.NoLog, opts.NoSigs = true, true
	s, err := server.NewServer(opts)
	testenv.Must(t, err, "nats server")
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	d.Server, d.URL = s, s.ClientURL()
	return d
}

// Common is the configuration of a process that connects as identity id.
func (d *natsDeployment) Common(id string) platform.Common {
	return platform.Common{NATSURL: d.URL, NATSNkeyFile: d.Seeds[id], NATSTLSCA: d.CA.File,
		Env: platform.EnvDevelopment, Replicas: 1, RequestsMaxAge: events.DefaultRequestsMaxAge}
}

// identityConn is a connection as one identity that keeps every asynchronous error the
// server sent it, so a test can tell which publish or subscription was refused.
type identityConn struct {
	id string
	nc *nats.Conn
	js jetstream.JetStream

	mu   sync.Mutex
	errs []error
}

// connectAs connects as identity id over TLS with its nkey seed file, through
// platform.NATSCredentials as the services and the CLI do.
func (d *natsDeployment) connectAs(t *testing.T, id string) *identityConn {
	t.Helper()
	c := &identityConn{id: id}
	inbox := "_INBOX"
	for _, i := range deployIdentities {
		if i.id == id {
			inbox = i.inbox
		}
	}
	opts := append([]nats.Option{nats.Name("test-" + id), nats.CustomInboxPrefix(inbox), nats.PermissionErrOnSubscribe(true),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			c.mu.Lock()
			c.errs = append(c.errs, err)
			c.mu.Unlock()
		})}, platform.NATSCredentials(d.Common(id))...)
	nc, err := nats.Connect(d.URL, opts...)
	testenv.Must(t, err, "connect as %s", id)
	t.Cleanup(nc.Close)
	if _, state := platform.NATSPeer(nc); state == nil {
		t.Fatalf("%s: the connection is not TLS", id)
	}
	c.nc = nc
	c.js, err = jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	return c
}

// violation waits for the server's permissions violation on subject (the text after
// "Permissions Violation for ", e.g. `Publish to "otp.issued.acme"`).
func (c *identityConn) violation(what string) error {
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		for _, err := range c.errs {
			if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), "Permissions Violation for "+what) {
				c.mu.Unlock()
				return nil
			}
		}
		c.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s: no permissions violation for %s; errors seen: %v", c.id, what, c.seen())
}

// noViolation fails when the server refused anything naming subject.
func (c *identityConn) noViolation(subject string) error {
	if err := c.nc.Flush(); err != nil {
		return err
	}
	time.Sleep(100 * time.Millisecond) // the error callback runs on its own goroutine
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, err := range c.errs {
		if strings.Contains(err.Error(), `"`+subject+`"`) {
			return fmt.Errorf("%s: %w", c.id, err)
		}
	}
	return nil
}

func (c *identityConn) seen() []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]error(nil), c.errs...)
}

// provisionAsAdmin creates the contract's streams and every durable consumer as the
// provisioning admin.
func provisionAsAdmin(t *testing.T, d *natsDeployment) {
	t.Helper()
	admin := d.connectAs(t, "admin")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	testenv.Must(t, platform.EnsureStreams(ctx, admin.js, events.StreamOptions{}), "provision streams")
	for _, c := range []struct {
		stream string
		cfg    jetstream.ConsumerConfig
	}{
		{events.StreamRequests, events.IssuerConsumer},
		{events.StreamDispatch, events.DispatcherConsumer},
		{events.StreamChallenges, events.VerifierConsumer},
		{events.StreamEvents, events.VerifierLegacyConsumer},
		{events.StreamEvents, events.AuditorConsumer},
		{events.StreamEvents, events.ErasureConsumer("issuer")},
		{events.StreamEvents, events.ErasureConsumer("dispatcher")},
		{events.StreamEvents, events.ErasureConsumer("verifier")},
	} {
		_, err := platform.EnsureConsumer(ctx, admin.js, c.stream, c.cfg)
		testenv.Must(t, err, "provision consumer %s on %s", c.cfg.Durable, c.stream)
	}
}
