package verifier

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

// idleHarness is a harness whose verifier is not started yet (h.replica starts one), on
// pool, with both projection consumers (OTP_CHALLENGES and, of earlier releases,
// OTP_EVENTS) redelivering at most maxDeliver times.
func idleHarness(t *testing.T, pool *pgxpool.Pool, maxDeliver int) *harness {
	t.Helper()
	nc, js := testenv.JetStream(t, testenv.NATS(t))
	for _, c := range []struct {
		stream string
		cc     jetstream.ConsumerConfig
	}{{events.StreamChallenges, events.VerifierConsumer}, {events.StreamEvents, events.VerifierLegacyConsumer}} {
		c.cc.MaxDeliver = maxDeliver
		_, err := js.CreateOrUpdateConsumer(t.Context(), c.stream, c.cc)
		testenv.Must(t, err, "consumer on %s", c.stream)
	}
	pepper, err := keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subject key")
	return &harness{nc: nc, js: js, pool: pool, pepper: pepper, subjects: subjects, issuerRing: subjects, dlq: testenv.DLQKey(t)}
}

// publishAs publishes body as typ for tenant acme with id as its Nats-Msg-Id and in a
// header of its own, and returns its stream sequence.
func (h *harness) publishAs(t *testing.T, typ events.Type, id string, body []byte) uint64 {
	t.Helper()
	m := nats.NewMsg(typ.Subject("acme"))
	m.Data = body
	m.Header.Set(jetstream.MsgIDHeader, id)
	m.Header.Set("X-Test-Event", id)
	ack, err := h.js.PublishMsg(t.Context(), m)
	testenv.Must(t, err, "publish %s", id)
	return ack.Sequence
}

// challengeBody is an otp.challenge of request id (challenge ch(n)) as the issuer makes it.
func (h *harness) challengeBody(t *testing.T, n int, id string) []byte {
	t.Helper()
	b, err := json.Marshal(challengeFor(t, h.pepper, "acme", ch(n), id, 1, "123456"))
	testenv.Must(t, err, "challenge %s", id)
	return b
}

// legacyBody is an otp.issued of an earlier release, which carried the recipient and the
// code HMAC (fields this release never writes, so spelled out here).
func (h *harness) legacyBody(t *testing.T, n int, id string) []byte {
	t.Helper()
	mac, err := h.pepper.MAC("p1", ch(n), "123456")
	testenv.Must(t, err, "mac")
	b, err := json.Marshal(map[string]any{"challenge_id": ch(n), "tenant": "acme", "request_id": id, "code_seq": 1,
		"recipient": id + "@example.com", "purpose": "login", "code_length": 6, "code_hmac": mac, "pepper_key_id": "p1",
		"max_attempts": 5, "issued_at": time.Now().UTC(), "expires_at": time.Now().Add(10 * time.Minute).UTC()})
	testenv.Must(t, err, "issued %s", id)
	return b
}

// poisonDatabase makes the database refuse the challenge of a request whose id starts
// with "poison" (a constraint) and fail, every time, with an error that names no cause on
// one starting with "stubborn" (a trigger raising).
func poisonDatabase(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	_, err := testenv.Admin(t, pool).Exec(t.Context(), `
		ALTER TABLE verifier.challenges ADD CONSTRAINT test_poison CHECK (request_id NOT LIKE 'poison%');
		CREATE FUNCTION verifier.test_stubborn() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.request_id LIKE 'stubborn%' THEN RAISE EXCEPTION 'a stubborn event'; END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER test_stubborn BEFORE INSERT ON verifier.challenges FOR EACH ROW EXECUTE FUNCTION verifier.test_stubborn()`)
	testenv.Must(t, err, "poison the database")
}

// projectedRequests are the request ids of the projected challenges.
func projectedRequests(t *testing.T, pool *pgxpool.Pool) map[string]bool {
	t.Helper()
	rows, err := pool.Query(t.Context(), `SELECT c.request_id FROM verifier.challenges c JOIN verifier.codes k USING (challenge_id)`)
	testenv.Must(t, err, "challenges")
	got := map[string]bool{}
	for rows.Next() {
		var id string
		testenv.Must(t, rows.Scan(&id), "scan")
		got[id] = true
	}
	testenv.Must(t, rows.Err(), "challenges")
	return got
}

// TestPoisonEventsDoNotStallTheProjection: each of the projection's consumers gets one
// batch of good events with, in the middle, one the database refuses (a constraint), one
// that fails in the database every time with an error that names no cause (a trigger
// raising) and one that does not decode. Every good event is projected; the three others
// go to OTP_DLQ — the refused and the undecodable at once, the failing one after its
// retries — with the consumer, the reason and the original headers; both consumers'
// acknowledgement floors reach the end of their streams with nothing left to redeliver.
func TestPoisonEventsDoNotStallTheProjection(t *testing.T) {
	pool := testenv.Postgres(t, Spec())
	h := idleHarness(t, pool, 3)
	poisonDatabase(t, pool)

	type letter struct{ stream, reason string }
	want := map[string]letter{}
	var good []string
	var lastChallenge, lastEvent uint64
	for i := range 6 {
		id := fmt.Sprintf("good-%d", i)
		good = append(good, id)
		lastChallenge = h.publishAs(t, events.TypeChallenge, id, h.challengeBody(t, i, id))
		if i == 2 {
			h.publishAs(t, events.TypeChallenge, "poison", h.challengeBody(t, 100, "poison"))
			h.publishAs(t, events.TypeChallenge, "undecodable", []byte(`{"challenge_id":`))
			h.publishAs(t, events.TypeChallenge, "stubborn", h.challengeBody(t, 101, "stubborn"))
		}
	}
	want["poison"] = letter{events.StreamChallenges, "verifier: database refused the data (SQLSTATE 23514, constraint test_poison)"}
	want["undecodable"] = letter{events.StreamChallenges, "verifier: "}
	want["stubborn"] = letter{events.StreamChallenges, "verifier: failed 3 times: "}
	for i := range 6 {
		id := fmt.Sprintf("legacy-%d", i)
		good = append(good, id)
		lastEvent = h.publishAs(t, events.TypeIssued, id, h.legacyBody(t, 200+i, id))
		if i == 2 {
			h.publishAs(t, events.TypeIssued, "poison-legacy", h.legacyBody(t, 300, "poison-legacy"))
			h.publishAs(t, events.TypeIssued, "undecodable-legacy", []byte(`not json`))
			h.publishAs(t, events.TypeIssued, "stubborn-legacy", h.legacyBody(t, 301, "stubborn-legacy"))
		}
	}
	legacyName := events.ConsumerVerifier + "-" + events.StreamEvents // its metrics label
	want["poison-legacy"] = letter{events.StreamEvents, legacyName + ": database refused the data (SQLSTATE 23514, constraint test_poison)"}
	want["undecodable-legacy"] = letter{events.StreamEvents, "verifier: "}
	// The status projection (verifier-status) refuses it too, with a dead letter of its
	// own (on OTP_EVENTS a dead letter's id names its consumer).
	also := map[string]letter{"undecodable-legacy": {events.StreamEvents, events.VerifierStatusConsumer.Durable + ": "}}
	want["stubborn-legacy"] = letter{events.StreamEvents, legacyName + ": failed 3 times: "}

	h.svc, h.clock = h.replica(t, "", nil, nil) // every event of a stream in one batch

	dls := testenv.WaitMessages(t, h.js, events.StreamDLQ, events.TypeDLQ.Wildcard(), len(want)+len(also), 30*time.Second)
	seen := map[string]bool{}
	for _, m := range dls {
		orig := testenv.OpenDeadLetter(t, h.dlq, m)
		id := nats.Header(orig.Header).Get("X-Test-Event")
		consumer := m.Header.Get(events.HeaderDLQConsumer)
		w, ok := want[id]
		if consumer == events.VerifierStatusConsumer.Durable {
			w, ok = also[id]
		}
		if r := m.Header.Get(events.HeaderDLQReason); !ok || seen[id+"|"+consumer] || !strings.HasPrefix(r, w.reason) {
			t.Errorf("dead letter of %q by %s with reason %q, want %q", id, consumer, r, w.reason)
		}
		seen[id+"|"+consumer] = true
		if (consumer != events.ConsumerVerifier && consumer != events.VerifierStatusConsumer.Durable) || m.Header.Get(events.HeaderDLQStream) != w.stream ||
			!strings.HasPrefix(orig.Subject, "otp.") || nats.Header(orig.Header).Get(jetstream.MsgIDHeader) != id {
			t.Errorf("dead letter of %q: headers %v, original %s %v", id, m.Header, orig.Subject, orig.Header)
		}
	}
	if len(dls) != len(want)+len(also) {
		t.Errorf("%d dead letters, want %d", len(dls), len(want)+len(also))
	}
	testenv.WaitDrained(t, h.js, events.StreamChallenges, events.ConsumerVerifier, lastChallenge, 10*time.Second)
	testenv.WaitDrained(t, h.js, events.StreamEvents, events.ConsumerVerifier, lastEvent, 10*time.Second)

	projected := projectedRequests(t, pool)
	for _, id := range good {
		if !projected[id] {
			t.Errorf("good event %s not projected", id)
		}
	}
	if len(projected) != len(good) {
		t.Errorf("projected %v, want the good events only", projected)
	}
	if r := h.verify(t, "good-4", "123456", ""); r.Status != events.StatusVerified {
		t.Errorf("a code after the poison: %+v", r)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != len(want)+len(also) {
		t.Errorf("%d dead letters in the end, want %d", n, len(want)+len(also))
	}
}

// TestDatabaseOutageDeadLettersNoEvent: while the verifier's database is unreachable (its
// connections cut at a proxy), the events that arrive are held and tried again, in order,
// not put back until their deliveries run out and not dead-lettered, although the
// consumer would dead-letter on a second delivery; once the database is back, every one
// is projected.
func TestDatabaseOutageDeadLettersNoEvent(t *testing.T) {
	pool := testenv.Postgres(t, Spec())
	via, proxy := testenv.PostgresProxy(t, pool)
	h := idleHarness(t, via, 2)
	reg := prometheus.NewRegistry()
	svc, err := New(Config{Pepper: h.pepper, Subjects: h.subjects, DLQKey: h.dlq}, via, h.nc, h.js, testenv.Logger(io.Discard), reg)
	testenv.Must(t, err, "verifier")
	testenv.Start(t, svc.Run)
	h.publishAs(t, events.TypeChallenge, "before", h.challengeBody(t, 1, "before"))
	testenv.Eventually(t, 10*time.Second, "the first event projected", func() bool { return projectedRequests(t, pool)["before"] })

	proxy.Cut()
	var last uint64
	for i := range 5 {
		id := fmt.Sprintf("during-%d", i)
		last = h.publishAs(t, events.TypeChallenge, id, h.challengeBody(t, 10+i, id))
	}
	// Two tries after the first, 1 + 2 s: past the second delivery a retry would have
	// had, and its dead letter. The events are held instead, on their first delivery.
	held := func() float64 {
		mfs, err := reg.Gather()
		testenv.Must(t, err, "gather")
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				if mf.GetName() == "otpflow_deliveries_held_retries_total" && m.GetLabel()[0].GetValue() == events.ConsumerVerifier {
					return m.GetCounter().GetValue()
				}
			}
		}
		return 0
	}
	testenv.Eventually(t, 20*time.Second, "the held events tried again twice, or a dead letter", func() bool {
		return held() >= 2 || len(testenv.Messages(t, h.js, events.StreamDLQ, "")) > 0
	})
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 0 || held() < 2 {
		t.Fatalf("%d dead letters during the outage, %v tries of the held events", n, held())
	}
	cons, err := h.js.Consumer(t.Context(), events.StreamChallenges, events.ConsumerVerifier)
	testenv.Must(t, err, "consumer")
	if info, err := cons.Info(t.Context()); err != nil || info.NumRedelivered != 0 || info.NumAckPending != 5 {
		t.Fatalf("during the outage: %+v, %v; want 5 waiting for an ack, none redelivered", info, err)
	}

	proxy.Restore()
	testenv.WaitDrained(t, h.js, events.StreamChallenges, events.ConsumerVerifier, last, 30*time.Second)
	projected := projectedRequests(t, pool)
	for i := range 5 {
		if !projected[fmt.Sprintf("during-%d", i)] {
			t.Errorf("during-%d not projected after the outage", i)
		}
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 0 {
		t.Fatalf("%d dead letters", n)
	}
}
