package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/user"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// operatorRow is one otp.operator_action row of the audit log.
type operatorRow struct {
	Tenant, Masked, Payload string
	HasRecipientHash        bool
	Event                   events.OperatorAction
}

// operatorRows reads the audit log's otp.operator_action rows of one action, in stream order.
func operatorRows(t *testing.T, url, action string) []operatorRow {
	t.Helper()
	rows, err := openDB(t, url).Query(context.Background(), `SELECT tenant, recipient_masked, payload::text, recipient_hash IS NOT NULL
		FROM audit.events WHERE type = $1 AND payload->>'action' = $2 ORDER BY stream_seq`, string(events.TypeOperatorAction), action)
	if err != nil {
		return nil // the schema may not exist yet
	}
	defer rows.Close()
	var out []operatorRow
	for rows.Next() {
		var r operatorRow
		testenv.Must(t, rows.Scan(&r.Tenant, &r.Masked, &r.Payload, &r.HasRecipientHash), "scan")
		testenv.Must(t, json.Unmarshal([]byte(r.Payload), &r.Event), "payload")
		out = append(out, r)
	}
	return out
}

// TestOperatorActionsAudited: erase and audit purge, run through the CLI against a running
// pipeline, each leave a row in the audit log that names the OS user and the host (the
// erasure its otp.erasure_requested, the purge an otp.operator_action that says what
// changed and holds no address); the chain still verifies.
func TestOperatorActionsAudited(t *testing.T) {
	w := newWorld(t)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())
	a.request(t, "acme", `{"request_id":"op-1","recipient":"Ana@Example.com","purpose":"login","context":{"ip":"203.0.113.9"}}`)
	w.smtp.WaitFor(t, 1, 30*time.Second)
	db := openDB(t, w.db)
	testenv.Eventually(t, 30*time.Second, "issue and delivery audited", func() bool { return len(auditTypes(t, db, "acme", "op-1")) == 2 })

	osUser, err := user.Current()
	testenv.Must(t, err, "os user")
	host, err := os.Hostname()
	testenv.Must(t, err, "host name")
	check := func(action, detail string) operatorRow {
		t.Helper()
		var rows []operatorRow
		testenv.Eventually(t, 30*time.Second, action+" audited", func() bool {
			rows = operatorRows(t, w.db, action)
			return len(rows) > 0
		})
		r := rows[0]
		if len(rows) != 1 || r.Tenant != "_system" || r.Event.Tenant != "_system" || r.Event.Action != action ||
			r.Event.Detail != detail || r.Event.At.IsZero() {
			t.Fatalf("%s rows: %+v", action, rows)
		}
		if r.Event.Identity.User != osUser.Username || r.Event.Identity.Host != host {
			t.Errorf("%s identity %+v, want user %q on %q", action, r.Event.Identity, osUser.Username, host)
		}
		if r.Event.Identity.NATSUser != "" {
			t.Errorf("%s: an anonymous connection named NATS user %q", action, r.Event.Identity.NATSUser)
		}
		// No address, masked or whole, in any spelling, and no hash of one.
		for _, pii := range []string{"ana@", "Ana@", "example.com", "Example.com", "***", "203.0.113.9"} {
			if strings.Contains(r.Payload, pii) {
				t.Errorf("%s payload holds %q: %s", action, pii, r.Payload)
			}
		}
		if r.HasRecipientHash || r.Masked != "" {
			t.Errorf("%s row is tied to a recipient: masked %q, hash %v", action, r.Masked, r.HasRecipientHash)
		}
		return r
	}

	// An erasure is requested by an event that names who asked, and only the person's hashes.
	if c, out := w.cli(t, "erase", "--tenant", "acme", "--recipient", "ana@example.com"); c != 0 {
		t.Fatalf("erase: exit %d, %s", c, out)
	}
	var req events.ErasureRequested
	testenv.Eventually(t, 30*time.Second, "the erasure and its four answers audited", func() bool {
		var n int
		_ = db.QueryRow(context.Background(), `SELECT count(*) FROM audit.events WHERE type = 'otp.erased'`).Scan(&n)
		var payload []byte
		err := db.QueryRow(context.Background(), `SELECT payload FROM audit.events WHERE type = 'otp.erasure_requested'`).Scan(&payload)
		return err == nil && json.Unmarshal(payload, &req) == nil && n == 4
	})
	if req.Identity.User != osUser.Username || req.Identity.Host != host || req.Tenant != "acme" || len(req.RecipientHashes) != 1 {
		t.Fatalf("erasure request %+v, want user %q on %q", req, osUser.Username, host)
	}

	// Purge everything older than a moment ago: the erasure's own record goes with the rest,
	// and the purge leaves a record of its own.
	time.Sleep(10 * time.Millisecond)
	if _, out := w.cli(t, "audit", "purge", "--db", w.auditDB, "--older-than", "1ms"); !strings.Contains(out, "purged 7 rows") {
		t.Fatalf("purge: %s", out)
	}
	check("audit.purge", "7 rows older than 1ms")
	if c, out := w.cli(t, "audit", "verify", "--db", w.auditDB); c != 0 {
		t.Fatalf("verify after erase and purge: exit %d, %s", c, out)
	}
}

// TestOperatorActionNotAudited: when the event cannot be published (here on a NATS server
// where OTP_EVENTS was never provisioned), the command still did what it was asked, says
// so, and exits non-zero.
func TestOperatorActionNotAudited(t *testing.T) {
	w := newWorld(t)
	w.env["OTP_NATS_URL"] = testenv.NATS(t).ClientURL()
	var out, errOut bytes.Buffer
	code, err := run(context.Background(), []string{"audit", "purge", "--db", w.auditDB}, w.getenv, &out, &errOut)
	if code == 0 || err == nil || !strings.Contains(err.Error(), "audit purge was done (purged 0 rows) but NOT audited") {
		t.Fatalf("exit %d, %v; stdout %q", code, err, out.String())
	}
	if out.String() != "purged 0 rows\n" {
		t.Fatalf("stdout %q", out.String())
	}
	// Without NATS, nothing is done.
	w.env["OTP_NATS_URL"] = "nats://127.0.0.1:1"
	code, err = run(context.Background(), []string{"erase", "--tenant", "acme", "--recipient", "ana@example.com"}, w.getenv, &out, &errOut)
	if code == 0 || err == nil || !strings.Contains(err.Error(), "nothing done") {
		t.Fatalf("without NATS: exit %d, %v", code, err)
	}
}

// TestOperatorNATSUser: a command connected with credentials names the NATS user the server
// authenticated.
func TestOperatorNATSUser(t *testing.T) {
	opts := &server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		Users: []*server.User{{Username: "ops-alice", Password: "s3cret"}}}
	s, err := server.NewServer(opts)
	testenv.Must(t, err, "nats server")
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	t.Cleanup(s.Shutdown)
	nc, err := connectClient(strings.Replace(s.ClientURL(), "nats://", "nats://ops-alice:s3cret@", 1), func(string) string { return "" })
	testenv.Must(t, err, "connect")
	defer nc.Close()
	if id := operatorIdentity(context.Background(), nc); id.NATSUser != "ops-alice" || id.User == "" || id.Host == "" {
		t.Fatalf("identity %+v", id)
	}
}

// TestMigrateIsAudited: otpflow migrate with a NATS server records otp.operator_action
// "migrate" naming who ran it; with an unreachable one it does nothing; with none it
// migrates and says it was not recorded.
func TestMigrateIsAudited(t *testing.T) {
	w := newWorld(t)
	_, js := testenv.JetStream(t, w.nats)
	if c, out := w.cli(t, "migrate"); c != 0 || !strings.Contains(out, "migrated;") {
		t.Fatalf("migrate: exit %d\n%s", c, out)
	}
	msgs := testenv.Messages(t, js, events.StreamEvents, events.TypeOperatorAction.Wildcard())
	if len(msgs) != 1 {
		t.Fatalf("%d operator actions, want 1", len(msgs))
	}
	var a events.OperatorAction
	testenv.Must(t, json.Unmarshal(msgs[0].Data, &a), "operator action")
	osUser, err := user.Current()
	testenv.Must(t, err, "os user")
	if a.Action != "migrate" || a.Identity.User != osUser.Username || !strings.Contains(a.Detail, "schemas issuer, dispatcher, verifier, audit up to date") {
		t.Fatalf("operator action %+v", a)
	}

	w.env["OTP_NATS_URL"] = "nats://127.0.0.1:1"
	var out, errOut bytes.Buffer
	// run returns the error; main exits 1 with it.
	if _, err := run(context.Background(), []string{"migrate"}, w.getenv, &out, &errOut); err == nil || !strings.Contains(err.Error(), "nothing done") {
		t.Fatalf("with NATS unreachable: %v", err)
	}
	delete(w.env, "OTP_NATS_URL")
	if c, out := w.cli(t, "migrate"); c != 0 || !strings.Contains(out, "not recorded on OTP_EVENTS") {
		t.Fatalf("migrate without NATS: exit %d\n%s", c, out)
	}
}
