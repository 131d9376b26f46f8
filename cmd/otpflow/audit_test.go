package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/auditor"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
)

// cli runs one otpflow command with the world's environment.
func (w *world) cli(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code, err := run(context.Background(), args, w.getenv, &out, &errOut)
	if err != nil {
		t.Fatalf("otpflow %v: %v\n%s", args, err, errOut.String())
	}
	return code, out.String()
}

// TestAuditTrailReplayVerifyErase: a request that failed over from SES to the relay,
// then its trail, the chain check, replays to JSON lines and into a fresh database (equal
// to the live log, twice), and the erasure of the recipient.
func TestAuditTrailReplayVerifyErase(t *testing.T) {
	w := newWorld(t)
	srv := w.useSES(t)
	srv.SetFault(sestest.Always(sestest.Unavailable))
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())

	a.request(t, "acme", `{"request_id":"fo-1","recipient":"Ana@Example.com","purpose":"login","context":{"ip":"203.0.113.9"}}`)
	code := codeOf(t, w.smtp.WaitFor(t, 1, 30*time.Second)[0])
	a.request(t, "acme", `{"request_id":"other","recipient":"bo@example.com","purpose":"login"}`)
	a.verify(t, "acme", "fo-1", "000000")
	if r := a.verify(t, "acme", "fo-1", code); r.Status != events.StatusVerified {
		t.Fatalf("verify: %+v", r)
	}
	db := openDB(t, w.db)
	testenv.Eventually(t, 30*time.Second, "the whole story audited", func() bool {
		types := auditTypes(t, db, "acme", "fo-1")
		return len(types) == 4 && count(t, a.js, "otp.delivered.acme") == 2 && len(auditTypes(t, db, "acme", "other")) == 2
	})

	// The trail shows both providers: three SES failures, then the relay.
	_, trail := w.cli(t, "audit", "trail", "--db", w.auditDB, "--tenant", "acme", "--request-id", "fo-1")
	for _, want := range []string{"otp.requested", "otp.issued", "code 1 issued, 5 attempts",
		"delivered via smtp on delivery 1 (ses transient → ses transient → ses transient → smtp ok)",
		"verify failed: invalid_code, 4 attempts left", "verified with code 1 after 2 attempts"} {
		if !strings.Contains(trail, want) {
			t.Errorf("trail lacks %q:\n%s", want, trail)
		}
	}
	_, byRecipient := w.cli(t, "audit", "trail", "--db", w.auditDB, "--tenant", "acme", "--recipient", "ana@example.com", "--json")
	var steps []auditor.Step
	testenv.Must(t, json.Unmarshal([]byte(byRecipient), &steps), "trail json")
	if len(steps) != 5 || steps[0].Type != "otp.requested" || steps[1].Recipient != "A***@Example.com" {
		t.Fatalf("trail by recipient: %+v", steps)
	}

	if c, out := w.cli(t, "audit", "verify", "--db", w.auditDB); c != 0 || !strings.HasPrefix(out, "audit log intact: 6 rows") {
		t.Fatalf("verify: exit %d, %s", c, out)
	}

	// JSON lines: every event, or only one type.
	_, lines := w.cli(t, "audit", "replay")
	if n := strings.Count(lines, "\n"); n != 6 {
		t.Fatalf("replay printed %d lines, want 6:\n%s", n, lines)
	}
	_, issued := w.cli(t, "audit", "replay", "--type", "issued", "--tenant", "acme")
	sc := bufio.NewScanner(strings.NewReader(issued))
	nIssued := 0
	for sc.Scan() {
		var l struct{ Type, Subject string }
		testenv.Must(t, json.Unmarshal(sc.Bytes(), &l), "line")
		if l.Type != "otp.issued" {
			t.Fatalf("filtered replay gave %s", l.Type)
		}
		nIssued++
	}
	if nIssued != 2 {
		t.Fatalf("%d issued lines, want 2", nIssued)
	}
	hourAgo, inAnHour := time.Now().Add(-time.Hour).Format(time.RFC3339), time.Now().Add(time.Hour).Format(time.RFC3339)
	if _, out := w.cli(t, "audit", "replay", "--until", hourAgo); out != "" {
		t.Fatalf("--until an hour ago printed:\n%s", out)
	}
	if _, out := w.cli(t, "audit", "replay", "--since", inAnHour); out != "" {
		t.Fatalf("--since in an hour printed:\n%s", out)
	}
	if _, out := w.cli(t, "audit", "replay", "--since", hourAgo, "--until", inAnHour); strings.Count(out, "\n") != 6 {
		t.Fatalf("--since/--until around the run printed %d lines", strings.Count(out, "\n"))
	}

	// Rebuild into a fresh database, twice: equal to the live log row for row.
	fresh := testenv.Database(t)
	w.cli(t, "audit", "replay", "--to", fresh)
	w.cli(t, "audit", "replay", "--to", fresh)
	live, rebuilt := dumpAudit(t, w.db), dumpAudit(t, fresh)
	if live != rebuilt {
		t.Fatalf("replayed log differs from the live one:\nlive:\n%s\nreplayed:\n%s", live, rebuilt)
	}
	if c, _ := w.cli(t, "audit", "verify", "--db", fresh); c != 0 {
		t.Fatal("the replayed log does not verify")
	}

	// Erasure: the personal data goes, the chain still verifies.
	if _, out := w.cli(t, "audit", "erase", "--tenant", "acme", "--recipient", "ana@example.com"); !strings.Contains(out, "auditor    erased 4 rows") {
		t.Fatalf("erase: %s", out)
	}
	idle(t, a.js, events.StreamEvents, events.ConsumerAuditor)
	if c, out := w.cli(t, "audit", "verify", "--db", w.auditDB); c != 0 || !strings.Contains(out, "4 erased") {
		t.Fatalf("verify after erasure: exit %d, %s", c, out)
	}
	_, after := w.cli(t, "audit", "trail", "--db", w.auditDB, "--tenant", "acme", "--recipient", "ana@example.com")
	if !strings.Contains(after, "no events") {
		t.Fatalf("the erased recipient can still be found:\n%s", after)
	}
	// An edited row: exit 1 and the row.
	conn, err := db.Acquire(context.Background())
	testenv.Must(t, err, "acquire")
	_, err = conn.Exec(context.Background(), `SET session_replication_role = replica; UPDATE audit.events SET tenant = 'evil' WHERE chain_pos = 2`)
	conn.Release()
	testenv.Must(t, err, "tamper")
	if c, out := w.cli(t, "audit", "verify", "--db", w.auditDB); c != 1 || !strings.Contains(out, "BROKEN at chain position 2") {
		t.Fatalf("verify after tampering: exit %d, %s", c, out)
	}
}

// dumpAudit prints an audit log's rows, every column that replay must reproduce.
func dumpAudit(t *testing.T, url string) string {
	t.Helper()
	db := openDB(t, url)
	var out string
	err := db.QueryRow(context.Background(), `SELECT string_agg(concat_ws('|', stream_seq, subject, type, tenant, event_id, source,
		occurred_at, request_id, challenge_id, encode(recipient_hash, 'hex'), recipient_masked, payload::text, chain_pos,
		encode(prev_hash, 'hex'), encode(row_hash, 'hex'), pii::text, encode(pii_salt, 'hex'), encode(pii_digest, 'hex')), E'\n' ORDER BY chain_pos)
		FROM audit.events`).Scan(&out)
	testenv.Must(t, err, "dump")
	return out
}
