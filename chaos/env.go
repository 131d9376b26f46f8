package chaos

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
)

// Tenant is the tenant the load runs as.
const Tenant = "chaos"

// Services are the four services, in the order they start.
var Services = []string{"auditor", "verifier", "dispatcher", "issuer"}

// Options shape one environment.
type Options struct {
	// NATSNodes is 1 (one server) or 3 (a cluster; the streams get three replicas).
	NATSNodes int
	// Env adds to or overrides the services' environment.
	Env map[string]string
	// NATSDisk, when set, gives the (single) NATS server a store on a file system of its
	// own of this many bytes (a tmpfs; mounting one needs root), so the suite can fill it.
	NATSDisk int64
	// SESAnswerDelay, when set, is how long each SES answer takes to come back after SES
	// took the mail.
	SESAnswerDelay time.Duration
}

// Env is one whole deployment on this machine: a private PostgreSQL cluster, NATS
// server processes, the four services as processes, an SMTP relay and an SES v2
// endpoint (each behind a Proxy that can take it down), provisioned with the real
// `otpflow provision`.
type Env struct {
	Dir      string
	PG       *testenv.PGCluster
	DB       string // the database as its administrator: the suite's own reads
	NATS     []*NATSServer
	SMTP     *testenv.SMTPServer
	SMTPWire *Proxy
	SES      *sestest.Server
	SESWire  *Proxy
	Procs    map[string]*Process
	// Concurrency is the dispatcher's OTP_DISPATCH_CONCURRENCY: the sends one process
	// can have in flight.
	Concurrency int
	env         map[string]string
	opsAddr     map[string]string
	pool        *pgxpool.Pool
	mailbox     mailbox
	// inFlightAtKill is how many sends a killed dispatcher had in flight.
	inFlightAtKill int
	// disk is the NATS server's own file system (Options.NATSDisk), "" if none.
	disk string
	// lastAck is when the load last had a request acknowledged.
	lastAck func() time.Time
}

// FillDisk fills the NATS server's file system (Options.NATSDisk) to the last byte.
func (e *Env) FillDisk() error {
	if e.disk == "" {
		return errors.New("the NATS server has no disk of its own (Options.NATSDisk)")
	}
	f, err := os.Create(filepath.Join(e.disk, "filler"))
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return nil
			}
			return err
		}
	}
}

// FreeDisk gives back what FillDisk took.
func (e *Env) FreeDisk() error { return os.Remove(filepath.Join(e.disk, "filler")) }

// NewEnv brings a whole deployment up and waits until every service is ready; it is
// torn down at cleanup. OTP_CHAOS_KEEP=1 keeps its directory (logs, stores) for reading.
func NewEnv(tb testing.TB, bins Bins, o Options) *Env {
	tb.Helper()
	if o.NATSNodes == 0 {
		o.NATSNodes = 1
	}
	dir, err := os.MkdirTemp("", "otpflow-chaos-")
	testenv.Must(tb, err, "environment directory")
	tb.Cleanup(func() {
		if os.Getenv("OTP_CHAOS_KEEP") == "1" || tb.Failed() {
			tb.Logf("logs and stores kept in %s", dir)
			return
		}
		_ = os.RemoveAll(dir)
	})
	e := &Env{Dir: dir, Procs: map[string]*Process{}, opsAddr: map[string]string{}, Concurrency: 16}

	e.PG = testenv.PrivatePostgres(tb)
	e.DB = e.PG.CreateDatabase(tb, "otpflow")
	e.pool, err = pgxpool.New(context.Background(), e.DB)
	testenv.Must(tb, err, "pool")
	tb.Cleanup(e.pool.Close)

	if o.NATSDisk > 0 {
		e.disk = filepath.Join(dir, "n1")
		testenv.Must(tb, os.MkdirAll(e.disk, 0o755), "NATS disk")
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", o.NATSDisk), "tmpfs", e.disk).CombinedOutput(); err != nil {
			tb.Skipf("a disk of NATS's own needs a tmpfs mount, which failed (root only): %v %s", err, out)
		}
		tb.Cleanup(func() { _ = exec.Command("umount", "-l", e.disk).Run() }) // runs after NATS is killed
	}
	e.NATS, err = StartNATS(bins, dir, o.NATSNodes)
	testenv.Must(tb, err, "start NATS")
	tb.Cleanup(func() {
		for _, s := range e.NATS {
			_ = s.Kill()
		}
	})
	for _, s := range e.NATS {
		testenv.Must(tb, WaitJetStream(s.URL(), 30*time.Second), "NATS %s", s.Name)
	}

	e.SMTP = testenv.StartSMTP(tb)
	e.SMTPWire = NewProxy(tb, e.SMTP.Addr)
	e.SES = sestest.New(tb)
	u, err := url.Parse(e.SES.URL)
	testenv.Must(tb, err, "SES URL")
	e.SESWire = NewProxy(tb, u.Host)
	e.SESWire.Delay(o.SESAnswerDelay)

	e.env = map[string]string{
		"PATH": os.Getenv("PATH"), "HOME": os.Getenv("HOME"),
		"OTP_NATS_URL":             URLs(e.NATS),
		"OTP_NATS_REPLICAS":        fmt.Sprint(o.NATSNodes),
		"OTP_MIGRATE_DATABASE_URL": e.DB,
		"OTP_DB_ROLE_PREFIX":       platform.DefaultRolePrefix,
		"OTP_CODE_PEPPER":          keys.Generate("p1", 32),
		"OTP_SEAL_KEY":             keys.Generate("s1", 32),
		"OTP_AUDIT_KEY":            keys.Generate("a1", 32),
		"OTP_AUDIT_CHAIN_KEY":      keys.Generate("c1", 32),
		"OTP_AUDIT_SIGNING_KEY":    keys.Generate("sig1", 32),
		"OTP_SUBJECT_KEY":          keys.Generate("k1", 32),
		"OTP_DLQ_KEY":              keys.Generate("d1", 32),
		"OTP_TENANTS_FILE":         tenantsFile(tb, dir),
		"OTP_PROVIDERS":            "ses,smtp",
		"OTP_SES_REGION":           "eu-west-1",
		"OTP_SES_ENDPOINT":         "http://" + e.SESWire.Addr,
		// The fake account reports 14/s; a real one sized for this load would allow more.
		"OTP_SES_MAX_SEND_RATE":     "1000",
		"OTP_SMTP_URL":              "smtp://" + e.SMTPWire.Addr + "?tls=none",
		"OTP_MAIL_FROM":             "Chaos <no-reply@chaos.example.com>",
		"OTP_DISPATCH_CONCURRENCY":  fmt.Sprint(e.Concurrency),
		"OTP_LOG_LEVEL":             "info",
		"AWS_ACCESS_KEY_ID":         "test",
		"AWS_SECRET_ACCESS_KEY":     "test",
		"AWS_EC2_METADATA_DISABLED": "true",
	}
	for _, s := range Services {
		role, err := platform.RoleURL(e.DB, platform.ServiceRole(platform.DefaultRolePrefix, s))
		testenv.Must(tb, err, "role URL")
		e.env[platform.DatabaseURLVar(s)] = role
	}
	for k, v := range o.Env {
		e.env[k] = v
	}
	if c := e.env["OTP_DISPATCH_CONCURRENCY"]; c != "" {
		_, _ = fmt.Sscan(c, &e.Concurrency)
	}

	// Provisioning first, as an operator does: streams, consumers, roles, schemas.
	prov := exec.Command(bins.Path("otpflow"), "provision")
	prov.Env = e.environ(nil)
	out, err := prov.CombinedOutput()
	testenv.Must(tb, os.WriteFile(filepath.Join(dir, "provision.log"), out, 0o644), "provision log")
	if err != nil {
		tb.Fatalf("otpflow provision: %v\n%s", err, out)
	}

	ports, err := freePorts(len(Services))
	testenv.Must(tb, err, "ports")
	for i, s := range Services {
		e.opsAddr[s] = fmt.Sprintf("127.0.0.1:%d", ports[i])
		p := NewProcess(s, bins.Path(s), nil, e.environ(map[string]string{"OTP_HTTP_ADDR": e.opsAddr[s]}), filepath.Join(dir, s+".log"))
		testenv.Must(tb, p.Start(), "start %s", s)
		e.Procs[s] = p
		tb.Cleanup(func() { _ = p.Kill() })
	}
	for _, s := range Services {
		testenv.Must(tb, e.WaitReady(s, 60*time.Second), "%s ready", s)
	}
	return e
}

// environ is the services' environment with extra, as "K=V" strings.
func (e *Env) environ(extra map[string]string) []string {
	var out []string
	for k, v := range e.env {
		if _, ok := extra[k]; !ok {
			out = append(out, k+"="+v)
		}
	}
	for k, v := range extra {
		out = append(out, k+"="+v)
	}
	return out
}

// WaitReady waits until service answers 200 on /readyz.
func (e *Env) WaitReady(service string, timeout time.Duration) error {
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		resp, err := client.Get("http://" + e.opsAddr[service] + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready within %v; its log: %s", service, timeout, e.Procs[service].Log)
}

// Restart kills service with SIGKILL and starts it again at once.
func (e *Env) Restart(service string) error {
	if err := e.Procs[service].Kill(); err != nil {
		return err
	}
	return e.Procs[service].Start()
}

// Connect opens a client connection to the NATS servers, as an app would: every URL,
// reconnecting forever. It is closed at cleanup.
func (e *Env) Connect(tb testing.TB) (*nats.Conn, jetstream.JetStream) {
	tb.Helper()
	nc, err := nats.Connect(URLs(e.NATS), nats.MaxReconnects(-1), nats.ReconnectWait(250*time.Millisecond),
		nats.ReconnectBufSize(64<<20), nats.Timeout(2*time.Second))
	testenv.Must(tb, err, "connect to NATS")
	tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	testenv.Must(tb, err, "jetstream")
	return nc, js
}

// Pool is the suite's own pool on the database, as its administrator.
func (e *Env) Pool() *pgxpool.Pool { return e.pool }

// UnplannedRestarts names the services that exited on their own, with how often.
func (e *Env) UnplannedRestarts() string {
	var out []string
	for _, s := range Services {
		if n := e.Procs[s].Restarts(); n > 0 {
			out = append(out, fmt.Sprintf("%s ×%d", s, n))
		}
	}
	return strings.Join(out, ", ")
}

// testRecipients is how many fixed-code test addresses the tenant has.
const testRecipients = 200

// TestCode is the fixed code of every test recipient.
const TestCode = "424242"

// TestRecipient is the i-th test address of the tenant.
func TestRecipient(i int) string { return fmt.Sprintf("fixture%d@example.com", i) }

// tenantsFile writes the tenant policy: a short recipient cooldown, so that the load's
// supersessions (a new request for an address that asked a moment before) are issued,
// and the test recipients.
func tenantsFile(tb testing.TB, dir string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "tenants:\n  %s:\n    rate_limits:\n      recipient_cooldown: 1s\n    test_recipients:\n", Tenant)
	for i := range testRecipients {
		fmt.Fprintf(&b, "      %q: %q\n", TestRecipient(i), TestCode)
	}
	path := filepath.Join(dir, "tenants.yaml")
	testenv.Must(tb, os.WriteFile(path, []byte(b.String()), 0o644), "tenants file")
	return path
}
