package issuer

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

// idleHarness is a harness whose issuer is not started yet (h.start starts it), on pool,
// with the issuer's durable consumer redelivering at most maxDeliver times.
func idleHarness(t *testing.T, pool *pgxpool.Pool, maxDeliver int) *harness {
	t.Helper()
	_, js := testenv.JetStream(t, testenv.NATS(t))
	cc := events.IssuerConsumer
	cc.MaxDeliver = maxDeliver
	_, err := js.CreateOrUpdateConsumer(t.Context(), events.StreamRequests, cc)
	testenv.Must(t, err, "consumer")
	pepper, err := keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	sealer, err := keys.ParseSealer(keys.Generate("s1", 32))
	testenv.Must(t, err, "sealer")
	return &harness{js: js, pool: pool, pepper: pepper, sealer: sealer, policies: policy.Defaults(), reg: prometheus.NewRegistry()}
}

// publishRequest publishes the request body under request id id (its Nats-Msg-Id, and a
// header of the app's own) and returns its stream sequence.
func (h *harness) publishRequest(t *testing.T, id, body string) uint64 {
	t.Helper()
	m := nats.NewMsg("otp.requested.acme")
	m.Data = []byte(body)
	m.Header.Set(jetstream.MsgIDHeader, "req-"+id)
	m.Header.Set("X-App-Request", id)
	ack, err := h.js.PublishMsg(t.Context(), m)
	testenv.Must(t, err, "publish %s", id)
	return ack.Sequence
}

func requestBody(id string) string {
	return fmt.Sprintf(`{"request_id":%q,"recipient":"%s@example.com","purpose":"login"}`, id, id)
}

// issuedRequests are the request ids of the challenges the issuer holds.
func issuedRequests(t *testing.T, pool *pgxpool.Pool) map[string]bool {
	t.Helper()
	rows, err := pool.Query(t.Context(), `SELECT request_id FROM issuer.challenges`)
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

// counter reads one series of a counter vector from reg: the one whose labels include
// label=value.
func counter(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather")
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// TestPoisonRequestsDoNotStallTheIssuer: one batch of good requests with, in the middle,
// one the database refuses (a constraint), one that fails in the database every time
// with an error that names no cause (a trigger raising), and one that does not decode.
// Every good request is issued; the refused one goes to OTP_DLQ at once and the failing
// one after its retries, each with the consumer, the reason and its original headers; the
// undecodable one is rejected (the issuer's answer to bad input); the consumer's
// acknowledgement floor reaches the end of the stream with nothing left to redeliver.
func TestPoisonRequestsDoNotStallTheIssuer(t *testing.T) {
	pool := testenv.Postgres(t, Spec())
	h := idleHarness(t, pool, 3)
	_, err := testenv.Admin(t, pool).Exec(t.Context(), `
		ALTER TABLE issuer.challenges ADD CONSTRAINT test_poison CHECK (request_id <> 'poison');
		CREATE FUNCTION issuer.test_stubborn() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.request_id = 'stubborn' THEN RAISE EXCEPTION 'a stubborn request'; END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER test_stubborn BEFORE INSERT ON issuer.challenges FOR EACH ROW EXECUTE FUNCTION issuer.test_stubborn()`)
	testenv.Must(t, err, "poison the database")

	var good []string
	var last uint64
	for i := range 3 {
		good = append(good, fmt.Sprintf("good-%d", i))
		h.publishRequest(t, good[i], requestBody(good[i]))
	}
	h.publishRequest(t, "poison", requestBody("poison"))
	h.publishRequest(t, "undecodable", `{"request_id":"undecodable","recipient":`)
	h.publishRequest(t, "stubborn", requestBody("stubborn"))
	for i := 3; i < 6; i++ {
		good = append(good, fmt.Sprintf("good-%d", i))
		last = h.publishRequest(t, good[i], requestBody(good[i]))
	}
	h.start(t, keys.Generate("k1", 32)) // all of them in its first batch

	dls := testenv.WaitMessages(t, h.js, events.StreamDLQ, events.TypeDLQ.Wildcard(), 2, 30*time.Second)
	want := map[string]string{
		"poison":   "issuer: database refused the data (SQLSTATE 23514, constraint test_poison)",
		"stubborn": "issuer: failed 3 times: ",
	}
	for _, m := range dls {
		orig := testenv.OpenDeadLetter(t, h.dlq, m)
		id := nats.Header(orig.Header).Get("X-App-Request")
		if r := m.Header.Get(events.HeaderDLQReason); want[id] == "" || !strings.HasPrefix(r, want[id]) {
			t.Errorf("dead letter of %q with reason %q, want %q", id, r, want[id])
		}
		if m.Header.Get(events.HeaderDLQConsumer) != events.ConsumerIssuer || m.Header.Get(events.HeaderDLQStream) != events.StreamRequests ||
			orig.Subject != "otp.requested.acme" || nats.Header(orig.Header).Get(jetstream.MsgIDHeader) != "req-"+id ||
			string(orig.Data) != requestBody(id) {
			t.Errorf("dead letter of %q: headers %v, original %s %v %s", id, m.Header, orig.Subject, orig.Header, orig.Data)
		}
		delete(want, id)
	}
	if len(want) != 0 || len(dls) != 2 {
		t.Errorf("%d dead letters; missing %v", len(dls), want)
	}
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, last, 10*time.Second)

	issued := issuedRequests(t, pool)
	for _, id := range good {
		if !issued[id] {
			t.Errorf("good request %s not issued", id)
		}
	}
	if len(issued) != len(good) {
		t.Errorf("issued %v, want the good requests only", issued)
	}
	rejected := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.rejected.acme", 1, 10*time.Second)
	if rej := decode[events.Rejected](t, rejected[0]); len(rejected) != 1 || rej.Reason != events.ReasonMalformedJSON {
		t.Errorf("rejections %d, first %+v", len(rejected), rej)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 2 {
		t.Errorf("%d dead letters, want 2", n)
	}
}

// TestDatabaseOutageDeadLettersNothing: while the issuer's database is unreachable (its
// connections cut at a proxy), the requests that arrive are held and tried again, in
// order, not redelivered until their deliveries run out and not dead-lettered, although
// the consumer would dead-letter on a second delivery; once the database is back, every
// one is issued.
func TestDatabaseOutageDeadLettersNothing(t *testing.T) {
	pool := testenv.Postgres(t, Spec())
	via, proxy := testenv.PostgresProxy(t, pool)
	h := idleHarness(t, via, 2)
	h.start(t, keys.Generate("k1", 32))
	h.publishRequest(t, "before", requestBody("before"))
	testenv.Eventually(t, 10*time.Second, "the first request issued", func() bool { return issuedRequests(t, pool)["before"] })

	proxy.Cut()
	var last uint64
	for i := range 5 {
		last = h.publishRequest(t, fmt.Sprintf("during-%d", i), requestBody(fmt.Sprintf("during-%d", i)))
	}
	// Two tries after the first, 1 + 2 s: past the second delivery a retry would have
	// had, and its dead letter.
	held := func() float64 {
		return counter(t, h.reg, "otpflow_deliveries_held_retries_total", "consumer", events.ConsumerIssuer)
	}
	testenv.Eventually(t, 20*time.Second, "the held requests tried again twice, or a dead letter", func() bool {
		return held() >= 2 || len(testenv.Messages(t, h.js, events.StreamDLQ, "")) > 0
	})
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 0 || held() < 2 {
		t.Fatalf("%d dead letters during the outage, %v tries of the held requests", n, held())
	}
	if n := counter(t, h.reg, "otpflow_deliveries_settled_total", "outcome", "retry"); n != 0 {
		t.Fatalf("%v requests put back during the outage, spending their deliveries", n)
	}

	proxy.Restore()
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, last, 30*time.Second)
	issued := issuedRequests(t, pool)
	for i := range 5 {
		if !issued[fmt.Sprintf("during-%d", i)] {
			t.Errorf("during-%d not issued after the outage", i)
		}
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 0 {
		t.Fatalf("%d dead letters", n)
	}
}

// TestTheIssuerDeadLettersARequestItsClientNeverHandsOver: an app publishes a request the
// JetStream client takes for a status of the server (an empty body and a Status header).
// The issuer pulls on past it and issues the request after it. The server gives it up
// after its deliveries; its advisory waits on OTP_ADVISORIES while the issuer's durable
// there does not exist (a provisioning of an earlier release), which
// otpflow_issuer_consumer_missing shows; once provisioning makes it, the issuer
// dead-letters the request, with its consumer and why, without a restart.
func TestTheIssuerDeadLettersARequestItsClientNeverHandsOver(t *testing.T) {
	ctx := t.Context()
	nc, js := testenv.JetStream(t, testenv.NATS(t))
	cc := events.IssuerConsumer
	cc.MaxDeliver, cc.AckWait = 2, time.Second
	_, err := js.CreateOrUpdateConsumer(ctx, events.StreamRequests, cc)
	testenv.Must(t, err, "a short redelivery")
	testenv.Must(t, js.DeleteConsumer(ctx, events.StreamAdvisories, events.ConsumerIssuerExhausted), "as an earlier provisioning left it")
	issued, err := nc.SubscribeSync(events.TypeIssued.Wildcard())
	testenv.Must(t, err, "subscribe")
	reg := prometheus.NewRegistry()
	testenv.Start(t, newIssuer(t, js, reg, Config{ConsumersCheckEvery: 100 * time.Millisecond}).Run)
	exhaustedMissing := func() float64 {
		families, err := reg.Gather()
		testenv.Must(t, err, "gather")
		for _, f := range families {
			for _, m := range f.GetMetric() {
				if f.GetName() == "otpflow_issuer_consumer_missing" && m.GetLabel()[0].GetValue() == events.ConsumerIssuerExhausted {
					return m.GetGauge().GetValue()
				}
			}
		}
		return -1
	}

	lookAlike := nats.NewMsg("otp.requested.acme")
	lookAlike.Header.Set("Status", "400")
	lookAlike.Header.Set("Description", "Bad Request")
	ack, err := js.PublishMsg(ctx, lookAlike)
	testenv.Must(t, err, "publish the look-alike")
	_, err = js.Publish(ctx, "otp.requested.acme", []byte(`{"request_id":"after","recipient":"ana@example.com","purpose":"login"}`))
	testenv.Must(t, err, "publish a request after it")
	m, err := issued.NextMsg(20 * time.Second)
	testenv.Must(t, err, "the request after the look-alike issued")
	if got := decodeField(t, m.Data, "request_id"); got != "after" {
		t.Fatalf("issued %s", got)
	}
	testenv.Eventually(t, 30*time.Second, "the server's advisory kept", func() bool {
		return len(testenv.Messages(t, js, events.StreamAdvisories, "")) == 1
	})
	testenv.Eventually(t, 10*time.Second, "the missing durable shown", func() bool { return exhaustedMissing() == 1 })
	if n := len(testenv.Messages(t, js, events.StreamDLQ, "")); n != 0 {
		t.Fatalf("%d dead letters without the durable", n)
	}

	_, err = js.CreateOrUpdateConsumer(ctx, events.StreamAdvisories, events.IssuerExhaustedConsumer)
	testenv.Must(t, err, "provisioning makes the durable")
	dl := testenv.WaitMessages(t, js, events.StreamDLQ, "otp.dlq.acme", 1, 30*time.Second)
	if h := dl[0].Header; h.Get(events.HeaderDLQConsumer) != events.ConsumerIssuer || h.Get(events.HeaderDLQSequence) != fmt.Sprint(ack.Sequence) ||
		!strings.Contains(h.Get(events.HeaderDLQReason), "Status header") {
		t.Errorf("dead letter %v", h)
	}
	testenv.Eventually(t, 10*time.Second, "the durable no longer missing", func() bool { return exhaustedMissing() == 0 })
	testenv.WaitDrained(t, js, events.StreamAdvisories, events.ConsumerIssuerExhausted, 1, 10*time.Second)
}
