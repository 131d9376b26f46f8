package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/platform/testenv"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	defer ln.Close()
	return ln.Addr().String()
}

// TestDevWalkthrough runs "otpflow dev" and the README walkthrough against it: request,
// read the mail from the sandbox Maildir, verify; and checks the ops endpoints.
func TestDevWalkthrough(t *testing.T) {
	dir := t.TempDir()
	httpAddr := freeAddr(t)
	d := testenv.NewDB(t)
	env := map[string]string{"OTP_DATABASE_URL": d.URL, "OTP_DB_ROLE_PREFIX": d.Prefix, "OTP_HTTP_ADDR": httpAddr}
	getenv := func(k string) string { return env[k] }

	ctx, cancel := context.WithCancel(context.Background())
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() {
		_, err := run(ctx, []string{"dev", "-dir", dir, "-nats-port", "-1"}, getenv, &out, io.Discard)
		done <- err
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("dev: %v", err)
		}
	}()
	testenv.Eventually(t, 20*time.Second, "dev to write its NATS URL", func() bool {
		_, err := os.Stat(filepath.Join(dir, "nats.url"))
		return err == nil
	})

	cli := func(args ...string) (int, string) {
		var stdout bytes.Buffer
		code, err := run(context.Background(), append(args, "-dir", dir), func(string) string { return "" }, &stdout, io.Discard)
		if err != nil {
			t.Fatalf("otpflow %v: %v", args, err)
		}
		return code, stdout.String()
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		var stdout bytes.Buffer
		_, err := run(context.Background(), []string{"request", "-dir", dir, "-tenant", "demo", "-request-id", "r1", "-recipient", "ana@example.com"},
			func(string) string { return "" }, &stdout, io.Discard)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("request: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // the streams may not exist yet
	}

	var mail []byte
	testenv.Eventually(t, 30*time.Second, "the mail in the sandbox Maildir", func() bool {
		files, _ := filepath.Glob(filepath.Join(dir, "mail", "new", "*"))
		if len(files) == 0 {
			return false
		}
		mail, _ = os.ReadFile(files[0])
		return true
	})
	code := codeOf(t, testenv.Mail{Data: mail}) // the code is in the body, never in the subject
	wrong := "000000"
	if code == wrong {
		wrong = "111111"
	}
	var status int
	var reply string
	testenv.Eventually(t, 10*time.Second, "the verifier to know the challenge", func() bool {
		status, reply = cli("verify", "-tenant", "demo", "-request-id", "r1", "-code", wrong)
		return !strings.Contains(reply, "not_found")
	})
	if status != 3 || !strings.Contains(reply, `"status":"invalid_code","attempts_remaining":4`) {
		t.Fatalf("wrong code: exit %d, %s", status, reply)
	}
	if status, reply = cli("verify", "-tenant", "demo", "-request-id", "r1", "-code", code); status != 0 || !strings.Contains(reply, `"verified"`) {
		t.Fatalf("right code: exit %d, %s", status, reply)
	}
	if _, reply = cli("verify", "-tenant", "demo", "-request-id", "r1", "-code", code); !strings.Contains(reply, `"already_used"`) {
		t.Fatalf("again: %s", reply)
	}

	// The README's audit commands, with no secret and no database in the environment: the
	// dev keys serve, and they connect as the auditor's role that dev wrote down.
	if b, err := os.ReadFile(filepath.Join(dir, "auditor.db")); err != nil || strings.TrimSpace(string(b)) != d.RoleURL("auditor") {
		t.Fatalf("dev's auditor URL: %q, %v; want %q", b, err, d.RoleURL("auditor"))
	}
	testenv.Eventually(t, 20*time.Second, "the request's timeline", func() bool {
		_, reply = cli("audit", "trail", "--tenant", "demo", "--request-id", "r1")
		return strings.Contains(reply, "verified with code 1")
	})
	if status, reply = cli("audit", "verify"); status != 0 || !strings.Contains(reply, "audit log intact") {
		t.Fatalf("audit verify: exit %d, %s", status, reply)
	}

	for path, want := range map[string]string{
		"/healthz": "ok",
		"/readyz":  "ok",
		"/metrics": "otpflow_verifier_verifications_total",
	} {
		if path == "/metrics" {
			// The delivery metrics too: sends by provider and outcome, latency, breaker, lag.
			resp, err := http.Get("http://" + httpAddr + path)
			testenv.Must(t, err, "GET /metrics")
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			for _, m := range []string{`otpflow_dispatcher_sends_total{outcome="ok",provider="sandbox"} 1`,
				"otpflow_dispatcher_send_seconds_bucket", "otpflow_dispatcher_delivery_seconds_count 1",
				`otpflow_dispatcher_breaker_state{provider="sandbox"} 0`,
				`otpflow_consumer_pending_messages{consumer="dispatcher",stream="OTP_DISPATCH"}`,
				// Every durable consumer's lag, not only the dispatcher's (the alert rules read it).
				`otpflow_consumer_pending_messages{consumer="issuer",stream="OTP_REQUESTS"}`,
				`otpflow_consumer_pending_messages{consumer="verifier",stream="OTP_CHALLENGES"}`,
				`otpflow_consumer_ack_pending_messages{consumer="auditor",stream="OTP_EVENTS"}`,
				`otpflow_consumer_oldest_unsettled_age_seconds{consumer="issuer",stream="OTP_REQUESTS"}`} {
				if !strings.Contains(string(body), m) {
					t.Errorf("/metrics lacks %s", m)
				}
			}
		}
		resp, err := http.Get("http://" + httpAddr + path)
		testenv.Must(t, err, "GET %s", path)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(body), want) {
			t.Errorf("GET %s: %d %q", path, resp.StatusCode, body)
		}
	}
	if !strings.Contains(out.String(), filepath.Join(dir, "mail")) {
		t.Errorf("dev does not say where mail lands:\n%s", out.String())
	}
}

// TestDevNeverPrintsTheDatabasePassword runs "otpflow dev" on a database URL that carries
// a password, with OTP_ENV=production in the caller's environment: dev stays in
// development (the pipeline, sandbox mailbox and all, gets ready) and nothing it prints
// holds the password.
func TestDevNeverPrintsTheDatabasePassword(t *testing.T) {
	const password = "Pw-d0-not-print-7f3a"
	dir := t.TempDir()
	httpAddr := freeAddr(t)
	d := testenv.NewDB(t)
	u, err := url.Parse(d.URL)
	testenv.Must(t, err, "parse database URL")
	u.User = url.UserPassword(u.User.Username(), password) // the local server trusts loopback: the password is not checked
	env := map[string]string{"OTP_DATABASE_URL": u.String(), "OTP_DB_ROLE_PREFIX": d.Prefix, "OTP_HTTP_ADDR": httpAddr, "OTP_ENV": "production"}

	ctx, cancel := context.WithCancel(context.Background())
	var out testenv.LogBuffer
	done := make(chan error, 1)
	go func() {
		_, err := run(ctx, []string{"dev", "-dir", dir, "-nats-port", "-1"}, func(k string) string { return env[k] }, &out, &out)
		done <- err
	}()
	var runErr error
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			runErr = <-done
		}
	}
	defer stop()
	testenv.Eventually(t, 60*time.Second, "the pipeline ready", func() bool {
		select {
		case runErr = <-done:
			stopped = true
			t.Fatalf("dev stopped: %v\n%s", runErr, out.String())
		default:
		}
		resp, err := http.Get("http://" + httpAddr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	stop()
	printed := out.String()
	if runErr != nil {
		printed += runErr.Error()
	}
	if strings.Contains(printed, password) {
		t.Fatalf("dev printed the database password:\n%s", printed)
	}
	if !strings.Contains(printed, "PostgreSQL  postgres://postgres:xxxxx@") {
		t.Errorf("dev does not print where the database is:\n%s", printed)
	}
}
