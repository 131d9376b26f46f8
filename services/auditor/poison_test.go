package auditor

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

// poisonEnv is a JetStream with the contract's streams, the auditor's consumer redelivering
// at most maxDeliver times.
func poisonEnv(t *testing.T, maxDeliver int) jetstream.JetStream {
	t.Helper()
	_, js := testenv.JetStream(t, testenv.NATS(t))
	cc := events.AuditorConsumer
	cc.MaxDeliver = maxDeliver
	_, err := js.CreateOrUpdateConsumer(t.Context(), events.StreamEvents, cc)
	testenv.Must(t, err, "consumer")
	return js
}

// publishVerified publishes an otp.verified of request id with body (a verified event of
// request id when body is empty), id also its event id and in a header of its own, and
// returns its stream sequence.
func publishVerified(t *testing.T, js jetstream.JetStream, id, body string) uint64 {
	t.Helper()
	if body == "" {
		body = fmt.Sprintf(`{"challenge_id":"c-%s","tenant":"acme","request_id":%q,"code_seq":1,"attempts":1,"verified_at":"2026-11-26T10:03:00Z"}`, id, id)
	}
	m, err := events.NewMsg(events.TypeVerified, "acme", id, "", jsonRaw(`{}`), events.Envelope{Source: "test"})
	testenv.Must(t, err, "msg %s", id)
	m.Data = []byte(body) // as it comes, decodable or not
	m.Header.Set("X-Test-Event", id)
	ack, err := js.PublishMsg(t.Context(), m)
	testenv.Must(t, err, "publish %s", id)
	return ack.Sequence
}

// startAuditor runs an auditor on pool with its metrics in a registry it returns.
func startAuditor(t *testing.T, js jetstream.JetStream, pool *pgxpool.Pool) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewRegistry()
	svc, err := New(Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ, BatchSize: 50},
		pool, js, testenv.Logger(io.Discard), reg)
	testenv.Must(t, err, "auditor")
	testenv.Start(t, svc.Run)
	return reg
}

// chainedSeqs are the stream sequences of the log's rows in chain order.
func chainedSeqs(t *testing.T, pool *pgxpool.Pool) []uint64 {
	t.Helper()
	var out []uint64
	for _, s := range column(t, pool, `SELECT stream_seq::text FROM audit.events ORDER BY chain_pos`) {
		var n uint64
		_, err := fmt.Sscan(s, &n)
		testenv.Must(t, err, "stream_seq %q", s)
		out = append(out, n)
	}
	return out
}

// TestPoisonEventsDoNotStallTheLog: one batch of good events with, in the middle, one the
// log cannot store (a NUL character in a field), one the database refuses (a constraint),
// one that does not decode, one that fails twice and then succeeds, and one that fails in
// the database every time with an error that names no cause (a trigger raising). The good
// events and the one that recovered are chained in stream order: the auditor tries a
// failing event again in place, the events after it held behind it, and never chains a
// later event first. The four others go to OTP_DLQ — at once, or after its retries for the
// one that keeps failing — with the consumer, the reason and the original headers. The
// chain verifies; the consumer's acknowledgement floor reaches the end of the stream with
// nothing left to redeliver.
func TestPoisonEventsDoNotStallTheLog(t *testing.T) {
	js := poisonEnv(t, 3)
	pool := testenv.Postgres(t, Spec())
	_, err := testenv.Admin(t, pool).Exec(t.Context(), `
		ALTER TABLE audit.events ADD CONSTRAINT test_poison CHECK (request_id <> 'poison');
		CREATE SEQUENCE audit.test_flaky;
		CREATE FUNCTION audit.test_poison() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
		BEGIN
			IF NEW.request_id = 'stubborn' THEN RAISE EXCEPTION 'a stubborn event'; END IF;
			IF NEW.request_id = 'flaky' AND nextval('audit.test_flaky') <= 2 THEN RAISE EXCEPTION 'a flaky event'; END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER test_poison BEFORE INSERT ON audit.events FOR EACH ROW EXECUTE FUNCTION audit.test_poison()`)
	testenv.Must(t, err, "poison the database")

	var chained []uint64 // what must be chained, in this order
	var last uint64
	for i := range 3 {
		chained = append(chained, publishVerified(t, js, fmt.Sprintf("good-%d", i), ""))
	}
	publishVerified(t, js, "nul", `{"challenge_id":"c-nul","tenant":"acme","request_id":"nul","note":"a\u0000b"}`)
	poisonSeq := publishVerified(t, js, "poison", "")
	publishVerified(t, js, "undecodable", `{"challenge_id":`)
	chained = append(chained, publishVerified(t, js, "flaky", ""))
	publishVerified(t, js, "stubborn", "")
	for i := 3; i < 6; i++ {
		last = publishVerified(t, js, fmt.Sprintf("good-%d", i), "")
		chained = append(chained, last)
	}
	startAuditor(t, js, pool) // every event in its first batch

	want := map[string]string{
		"nul":         "auditor: field note holds a NUL character",
		"poison":      "auditor: database refused the data (SQLSTATE 23514, constraint test_poison)",
		"undecodable": "auditor: ",
		"stubborn":    "auditor: failed 3 times: ",
	}
	dls := testenv.WaitMessages(t, js, events.StreamDLQ, events.TypeDLQ.Wildcard(), len(want), 30*time.Second)
	for _, m := range dls {
		orig := testenv.OpenDeadLetter(t, testDLQ, m)
		id := nats.Header(orig.Header).Get("X-Test-Event")
		if r := m.Header.Get(events.HeaderDLQReason); want[id] == "" || !strings.HasPrefix(r, want[id]) {
			t.Errorf("dead letter of %q with reason %q, want %q", id, r, want[id])
		}
		if m.Header.Get(events.HeaderDLQConsumer) != events.ConsumerAuditor || m.Header.Get(events.HeaderDLQStream) != events.StreamEvents ||
			orig.Subject != "otp.verified.acme" || nats.Header(orig.Header).Get(events.HeaderID) != id {
			t.Errorf("dead letter of %q: headers %v, original %s %v", id, m.Header, orig.Subject, orig.Header)
		}
		delete(want, id)
	}
	if len(want) != 0 || len(dls) != 4 {
		t.Errorf("%d dead letters; missing %v", len(dls), want)
	}
	testenv.WaitDrained(t, js, events.StreamEvents, events.ConsumerAuditor, last, 10*time.Second)

	if got := chainedSeqs(t, pool); !slices.Equal(got, chained) {
		t.Errorf("chained stream sequences %v, want %v in this order", got, chained)
	}
	rep, err := testChain.Verify(t.Context(), pool)
	testenv.Must(t, err, "verify")
	if !rep.OK() || rep.Rows != int64(len(chained)) {
		t.Errorf("verify: %+v", rep)
	}
	// What the log cannot store or does not decode has no row and is not asked for. An
	// event the database refused although ToRow took it is missing from the log, and the
	// anchored verification says so: the first such is the poison.
	rep, err = testChain.VerifyAnchored(t.Context(), pool, Anchors{JS: js})
	testenv.Must(t, err, "verify anchored")
	if rep.BrokenSeq != int64(poisonSeq) || !strings.Contains(rep.Problem, "no row") {
		t.Errorf("anchored verification: %+v, want the refused event at %d reported missing", rep, poisonSeq)
	}
	if n := len(testenv.Messages(t, js, events.StreamDLQ, "")); n != 4 {
		t.Errorf("%d dead letters in the end, want 4", n)
	}
}

// TestDatabaseOutageDeadLettersNoAuditEvent: while the auditor's database is unreachable
// (its connections cut at a proxy), the events that arrive are held and tried again in
// order, not dead-lettered, although the consumer would give an event up after two tries;
// once the database is back, every one is chained, in stream order, and the log verifies.
func TestDatabaseOutageDeadLettersNoAuditEvent(t *testing.T) {
	js := poisonEnv(t, 2)
	pool := testenv.Postgres(t, Spec())
	via, proxy := testenv.PostgresProxy(t, pool)
	reg := startAuditor(t, js, via)
	want := []uint64{publishVerified(t, js, "before", "")}
	testenv.Eventually(t, 10*time.Second, "the first event chained", func() bool { return len(chainedSeqs(t, pool)) == 1 })

	proxy.Cut()
	for i := range 5 {
		want = append(want, publishVerified(t, js, fmt.Sprintf("during-%d", i), ""))
	}
	// Two tries after the first, 1 + 2 s: as many as the consumer allows an event that
	// fails while the database answers.
	held := func() float64 {
		mfs, err := reg.Gather()
		testenv.Must(t, err, "gather")
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				if mf.GetName() == "otpflow_deliveries_held_retries_total" && m.GetLabel()[0].GetValue() == events.ConsumerAuditor {
					return m.GetCounter().GetValue()
				}
			}
		}
		return 0
	}
	testenv.Eventually(t, 20*time.Second, "the held events tried again twice, or a dead letter", func() bool {
		return held() >= 2 || len(testenv.Messages(t, js, events.StreamDLQ, "")) > 0
	})
	if n := len(testenv.Messages(t, js, events.StreamDLQ, "")); n != 0 || held() < 2 {
		t.Fatalf("%d dead letters during the outage, %v tries of the held events", n, held())
	}

	proxy.Restore()
	testenv.WaitDrained(t, js, events.StreamEvents, events.ConsumerAuditor, want[len(want)-1], 30*time.Second)
	if got := chainedSeqs(t, pool); !slices.Equal(got, want) {
		t.Errorf("chained stream sequences %v, want %v", got, want)
	}
	rep, err := testChain.Verify(t.Context(), pool)
	testenv.Must(t, err, "verify")
	if !rep.OK() || rep.Rows != int64(len(want)) {
		t.Errorf("verify: %+v", rep)
	}
	if n := len(testenv.Messages(t, js, events.StreamDLQ, "")); n != 0 {
		t.Fatalf("%d dead letters", n)
	}
}
