package auditor

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestUnknownEventsAndFieldsSurvive: during a rolling upgrade a newer producer publishes
// an event type this auditor does not know and a known type with fields it does not know.
// Both are stored, chained, verified and replayed with the unknown parts intact, and the
// personal fields still leave the payload.
func TestUnknownEventsAndFieldsSurvive(t *testing.T) {
	ctx := context.Background()
	_, js := testenv.JetStream(t, testenv.NATS(t))
	_, err := platform.Provision(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "streams")
	// The newer release's provisioning adds its subject to the audit stream.
	st, err := js.Stream(ctx, events.StreamEvents)
	testenv.Must(t, err, "stream")
	info, err := st.Info(ctx)
	testenv.Must(t, err, "stream info")
	cfg := info.Config
	cfg.Subjects = append(cfg.Subjects, "otp.opened.*")
	_, err = js.UpdateStream(ctx, cfg)
	testenv.Must(t, err, "add otp.opened.*")

	bodies := []struct {
		typ  events.Type
		body string
	}{
		{events.TypeIssued, `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","code_seq":1,"recipient":"ana@example.com","purpose":"login","max_attempts":5,"client_ip":"203.0.113.7","issued_at":"2026-11-26T10:02:00Z","expires_at":"2026-11-26T10:07:00Z"}`},
		{events.TypeVerified, `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","code_seq":1,"attempts":1,"verified_at":"2026-11-26T10:03:00Z","method":"passkey","device":{"id":12345678901234567890,"tags":["a","b"]}}`},
		{"otp.opened", `{"challenge_id":"c-1","request_id":"r-1","recipient":"ana@example.com","session_id":"s-9","kind":"complaint","source":{"feedback_id":"f-1"}}`},
	}
	for i, b := range bodies {
		m, err := events.NewMsg(b.typ, "acme", fmt.Sprintf("e-%d", i), "", jsonRaw(b.body), events.Envelope{Source: "newer"})
		testenv.Must(t, err, "msg")
		_, err = js.PublishMsg(ctx, m)
		testenv.Must(t, err, "publish %s", b.typ)
	}

	live := testenv.Postgres(t, Spec())
	svc, err := New(Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ}, live, js, testenv.Logger(io.Discard), nil)
	testenv.Must(t, err, "auditor")
	testenv.Start(t, svc.Run)
	testenv.Eventually(t, 10*time.Second, "three rows", func() bool { return len(payloads(t, live)) == 3 })

	got := payloads(t, live)
	for _, want := range []string{`"method": "passkey"`, `"id": 12345678901234567890`, `"tags": ["a", "b"]`} {
		if !strings.Contains(got[1], want) {
			t.Errorf("verified row lost %s: %s", want, got[1])
		}
	}
	for _, want := range []string{`"kind": "complaint"`, `"feedback_id": "f-1"`} {
		if !strings.Contains(got[2], want) {
			t.Errorf("otp.opened row lost %s: %s", want, got[2])
		}
	}
	for _, p := range got {
		if strings.Contains(p, "ana@") || strings.Contains(p, "203.0.113.7") || strings.Contains(p, "s-9") {
			t.Errorf("personal data left in the payload: %s", p)
		}
	}
	// The address becomes the subject hash and the masked form; the session is dropped.
	var typ, pii, masked, hash string
	testenv.Must(t, live.QueryRow(ctx, `SELECT type, recipient_masked, coalesce(pii::text, ''), convert_from(recipient_hash, 'UTF8')
		FROM audit.events WHERE stream_seq = 3`).Scan(&typ, &masked, &pii, &hash), "feedback row")
	if typ != "otp.opened" || masked != "a***@example.com" || pii != "" || hash != testSubjects.Subject("acme", "ana@example.com") {
		t.Errorf("otp.opened row: type %q, masked %q, pii %q, hash %q", typ, masked, pii, hash)
	}
	if rep, err := testChain.Verify(ctx, live); err != nil || !rep.OK() || rep.Rows != 3 {
		t.Fatalf("verify: %+v, %v", rep, err)
	}
	steps, err := Trail(ctx, live, testSubjects, "acme", "r-1", "")
	testenv.Must(t, err, "trail")
	var sums []string
	for _, s := range steps {
		sums = append(sums, s.Summary)
	}
	if len(steps) != 3 || sums[1] != "verified with code 1 after 1 attempts" || sums[2] != "otp.opened" {
		t.Errorf("trail: %q", sums)
	}

	// Replay the stream into a fresh log, as "otpflow audit replay --to" does.
	fresh := testenv.Postgres(t, Spec())
	var rows []*Row
	for _, m := range testenv.Messages(t, js, events.StreamEvents, "") {
		r, err := ToRow(testKey, testSubjects, m.Sequence, m.Time, m.Subject, m.Header, m.Data)
		testenv.Must(t, err, "replay row %d", m.Sequence)
		rows = append(rows, &r)
	}
	_, err = testChain.Append(ctx, fresh, rows)
	testenv.Must(t, err, "replay")
	if rep, err := testChain.Verify(ctx, fresh); err != nil || !rep.OK() || rep.Rows != 3 {
		t.Fatalf("verify the replayed log: %+v, %v", rep, err)
	}
	if a, b := dump(t, live), dump(t, fresh); a != b {
		t.Fatalf("replayed log differs:\nlive:\n%s\nreplayed:\n%s", a, b)
	}
}

// payloads returns the stored payloads in stream order, as jsonb prints them.
func payloads(t *testing.T, pool *pgxpool.Pool) []string {
	t.Helper()
	return column(t, pool, `SELECT payload::text FROM audit.events ORDER BY stream_seq`)
}

// dump prints every column of the log that a replay must reproduce.
func dump(t *testing.T, pool *pgxpool.Pool) string {
	t.Helper()
	return strings.Join(column(t, pool, `SELECT concat_ws('|', stream_seq, subject, type, tenant, event_id, source, occurred_at,
		request_id, challenge_id, encode(recipient_hash, 'hex'), recipient_masked, payload::text, pii::text, chain_pos,
		encode(prev_hash, 'hex'), encode(row_hash, 'hex')) FROM audit.events ORDER BY stream_seq`), "\n")
}

func column(t *testing.T, pool *pgxpool.Pool, sql string) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), sql)
	testenv.Must(t, err, "query")
	var out []string
	for rows.Next() {
		var s string
		testenv.Must(t, rows.Scan(&s), "scan")
		out = append(out, s)
	}
	testenv.Must(t, rows.Err(), "rows")
	return out
}
