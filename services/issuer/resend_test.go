package issuer

import (
	"io"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

const resendBody = `{"request_id":"rs","recipient":"rs@example.com","purpose":"login","resend":true}`

// publishAs publishes body on acme's requests under the Nats-Msg-Id id, naming the original
// redriveOf as `otpflow dlq redrive` does when set, and returns its stream sequence.
func (h *harness) publishAs(t *testing.T, id, redriveOf, body string) uint64 {
	t.Helper()
	m := nats.NewMsg("otp.requested.acme")
	m.Data = []byte(body)
	m.Header.Set(jetstream.MsgIDHeader, id)
	if redriveOf != "" {
		m.Header.Set(events.HeaderRedriveOf, redriveOf)
	}
	ack, err := h.js.PublishMsg(t.Context(), m)
	testenv.Must(t, err, "publish %s", id)
	return ack.Sequence
}

// outcomes are what OTP_EVENTS and the issuer's tables hold for challenge rs.
func (h *harness) outcomes(t *testing.T) (issued, rejected, dispatched, codes int) {
	t.Helper()
	issued = len(testenv.Messages(t, h.js, events.StreamEvents, "otp.issued.acme"))
	rejected = len(testenv.Messages(t, h.js, events.StreamEvents, "otp.rejected.acme"))
	dispatched = len(testenv.Messages(t, h.js, events.StreamDispatch, "otp.dispatch.acme"))
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT code_count FROM issuer.challenges WHERE request_id = 'rs'`).Scan(&codes), "challenge")
	return
}

// TestRedrivenResendIsADuplicate: a resend message, handled, then redriven from OTP_DLQ
// (the same request under a new Nats-Msg-Id, Otp-Redrive-Of naming the first) within the
// cooldown and again after it, gets one outcome: one new code, one otp.issued, one mail,
// and the copies are duplicates, never resend_cooldown or another code. A resend of its
// own still gets a fresh code, and one too soon the cooldown, as before.
func TestRedrivenResendIsADuplicate(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newTunedHarness(t, "", nil, reg)
	h.publishAs(t, "first", "", resendBody) // a new challenge, resend set or not
	testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", 1, 10*time.Second)
	h.advance(31 * time.Second)
	seq := h.publishAs(t, "resend-1", "", resendBody)
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, seq, 10*time.Second)
	if i, r, d, c := h.outcomes(t); i != 2 || r != 0 || d != 2 || c != 2 {
		t.Fatalf("the resend: %d issued, %d rejected, %d dispatched, code count %d; want 2, 0, 2, 2", i, r, d, c)
	}

	// Within the cooldown, then after it: each redrive is the same message.
	seq = h.publishAs(t, "redrive:7:resend-1", "resend-1", resendBody)
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, seq, 10*time.Second)
	h.advance(31 * time.Second)
	seq = h.publishAs(t, "redrive:9:resend-1", "resend-1", resendBody)
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, seq, 10*time.Second)
	if i, r, d, c := h.outcomes(t); i != 2 || r != 0 || d != 2 || c != 2 {
		t.Fatalf("after two redrives: %d issued, %d rejected, %d dispatched, code count %d; want 2, 0, 2, 2", i, r, d, c)
	}
	if n := counter(t, reg, "otpflow_issuer_requests_total", "outcome", "duplicate"); n != 2 {
		t.Fatalf("%v duplicates, want 2", n)
	}

	// Distinct resend messages: as before.
	seq = h.publishAs(t, "resend-2", "", resendBody)
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, seq, 10*time.Second)
	seq = h.publishAs(t, "resend-3", "", resendBody) // too soon
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, seq, 10*time.Second)
	if i, r, d, c := h.outcomes(t); i != 3 || r != 1 || d != 3 || c != 3 {
		t.Fatalf("two more resends: %d issued, %d rejected, %d dispatched, code count %d; want 3, 1, 3, 3", i, r, d, c)
	}
	rej := decode[events.Rejected](t, testenv.Messages(t, h.js, events.StreamEvents, "otp.rejected.acme")[0])
	if rej.Reason != events.ReasonRateLimited || rej.Limit != "resend_cooldown" {
		t.Fatalf("resend too soon: %+v", rej)
	}
	// Its redrive after the cooldown is that same refusal, not a code.
	h.advance(31 * time.Second)
	seq = h.publishAs(t, "redrive:11:resend-3", "resend-3", resendBody)
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, seq, 10*time.Second)
	if i, r, d, c := h.outcomes(t); i != 3 || r != 1 || d != 3 || c != 3 {
		t.Fatalf("a refused resend redriven: %d issued, %d rejected, %d dispatched, code count %d; want 3, 1, 3, 3", i, r, d, c)
	}

	// A request that is not a resend, redriven: a duplicate by its request id, as before.
	seq = h.publishAs(t, "plain", "", requestBody("pl"))
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, seq, 10*time.Second)
	seq = h.publishAs(t, "redrive:12:plain", "plain", requestBody("pl"))
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.ConsumerIssuer, seq, 10*time.Second)
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.issued.acme")); n != 4 {
		t.Fatalf("%d issued after a plain request was redriven, want 4", n)
	}
	if n := counter(t, reg, "otpflow_issuer_requests_total", "outcome", "duplicate"); n != 4 {
		t.Fatalf("%v duplicates, want 4", n)
	}
}

// TestRedeliveredResendIsADuplicate: a resend message whose acknowledgement was lost is
// handled again through the consumer's Handle path, within the cooldown and after it, the
// message having no Nats-Msg-Id (its identity is its stream sequence): one new code, one
// otp.issued, nothing refused.
func TestRedeliveredResendIsADuplicate(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := idleHarness(t, testenv.Postgres(t, Spec()), 5)
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subject key")
	svc, err := New(Config{Pepper: h.pepper, Sealer: h.sealer, Subjects: subjects, Policies: h.policies, DLQKey: testenv.DLQKey(t)},
		h.pool, h.js, testenv.Logger(io.Discard), reg)
	testenv.Must(t, err, "new issuer")
	svc.skew = func() time.Duration { h.mu.Lock(); defer h.mu.Unlock(); return h.skew }
	cons, err := h.js.Consumer(t.Context(), events.StreamRequests, events.ConsumerIssuer)
	testenv.Must(t, err, "consumer")
	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: events.ConsumerIssuer, BatchSize: 10, JS: h.js,
		Log: testenv.Logger(io.Discard), Reg: reg, Healthy: h.pool.Ping})
	fetch := func() []jetstream.Msg {
		t.Helper()
		b, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
		testenv.Must(t, err, "fetch")
		var msgs []jetstream.Msg
		for m := range b.Messages() {
			msgs = append(msgs, m)
		}
		testenv.Must(t, b.Error(), "fetch")
		if len(msgs) != 1 {
			t.Fatalf("fetched %d requests, want 1", len(msgs))
		}
		return msgs
	}

	h.request(t, resendBody)
	c.Handle(t.Context(), fetch(), svc.handleBatch)
	h.advance(31 * time.Second)
	h.request(t, resendBody)
	msgs := fetch()
	c.Handle(t.Context(), msgs, svc.handleBatch)
	if i, r, d, n := h.outcomes(t); i != 2 || r != 0 || d != 2 || n != 2 {
		t.Fatalf("the resend: %d issued, %d rejected, %d dispatched, code count %d; want 2, 0, 2, 2", i, r, d, n)
	}
	c.Handle(t.Context(), msgs, svc.handleBatch) // redelivered within the cooldown
	h.advance(31 * time.Second)
	c.Handle(t.Context(), msgs, svc.handleBatch) // and after it
	if i, r, d, n := h.outcomes(t); i != 2 || r != 0 || d != 2 || n != 2 {
		t.Fatalf("redelivered twice: %d issued, %d rejected, %d dispatched, code count %d; want 2, 0, 2, 2", i, r, d, n)
	}
	if n := counter(t, reg, "otpflow_issuer_requests_total", "outcome", "duplicate"); n != 2 {
		t.Fatalf("%v duplicates, want 2", n)
	}
}
