package verifier

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// statusFeed publishes OTP_EVENTS events as their producers do (events.NewMsg, each
// producer's Nats-Msg-Id) for the status projection, and remembers the last stream
// sequence, which drained waits for.
type statusFeed struct {
	t    *testing.T
	h    *harness
	last uint64
	// n numbers the rejections (their id is the request's stream sequence).
	n int
	// prefix goes before every message id: copies of events under new ids.
	prefix string
}

func (h *harness) statusFeed(t *testing.T) *statusFeed { return &statusFeed{t: t, h: h} }

func (f *statusFeed) publish(typ events.Type, tenant, id, challenge string, v any) {
	f.t.Helper()
	id = f.prefix + id
	m, err := events.NewMsg(typ, tenant, id, challenge, v, events.Envelope{Source: "test"})
	testenv.Must(f.t, err, "msg %s", id)
	ack, err := f.h.js.PublishMsg(context.Background(), m)
	testenv.Must(f.t, err, "publish %s", id)
	if ack.Duplicate {
		f.t.Fatalf("%s was a duplicate", id)
	}
	f.last = max(f.last, ack.Sequence)
}

// reqCode names one code of a request's challenge.
type reqCode struct {
	tenant, challenge, request string
	seq                        int
}

func (f *statusFeed) issued(c reqCode, recipient string, at, expires time.Time) {
	f.t.Helper()
	f.publish(events.TypeIssued, c.tenant, fmt.Sprintf("issued:%s:%d", c.challenge, c.seq), c.challenge, events.Issued{
		ChallengeID: c.challenge, Tenant: c.tenant, RequestID: c.request, CodeSeq: c.seq,
		RecipientHash: f.h.issuerRing.Subject(c.tenant, recipient), RecipientMasked: events.MaskAddress(recipient),
		Purpose: "login", CodeLength: 6, MaxAttempts: 5, Resend: c.seq > 1, IssuedAt: at, ExpiresAt: expires})
}

func (f *statusFeed) rejected(tenant, request string, reason events.RejectReason, detail string, at time.Time) {
	f.t.Helper()
	f.n++
	f.publish(events.TypeRejected, tenant, fmt.Sprintf("rejected:%s:%d", f.t.Name(), f.n), "", events.Rejected{
		Tenant: tenant, RequestID: request, Reason: reason, Detail: detail, RejectedAt: at})
}

func (f *statusFeed) delivered(c reqCode, at time.Time, unconfirmed bool) {
	f.t.Helper()
	f.publish(events.TypeDelivered, c.tenant, fmt.Sprintf("delivered:%s:%d", c.challenge, c.seq), c.challenge, events.Delivered{
		ChallengeID: c.challenge, Tenant: c.tenant, RequestID: c.request, CodeSeq: c.seq, Provider: "ses",
		ProviderMessageID: "m-" + c.challenge, Attempts: 1, Unconfirmed: unconfirmed, DeliveredAt: at})
}

// deliveryFailed publishes the dispatcher's giving up on code c: SES refused it for reason.
func (f *statusFeed) deliveryFailed(c reqCode, reason string, at time.Time) {
	f.t.Helper()
	f.deliveryFailedAs(c, events.DeliveryFailed{Provider: "ses", Reason: reason, Permanent: true, FailedAt: at})
}

// deliveryFailedAs publishes otp.delivery_failed for code c with v's provider, reason,
// permanence and time.
func (f *statusFeed) deliveryFailedAs(c reqCode, v events.DeliveryFailed) {
	f.t.Helper()
	v.ChallengeID, v.Tenant, v.RequestID, v.CodeSeq, v.Attempts = c.challenge, c.tenant, c.request, c.seq, 1
	f.publish(events.TypeDeliveryFailed, c.tenant, fmt.Sprintf("delivery_failed:%s:%d", c.challenge, c.seq), c.challenge, v)
}

func (f *statusFeed) dispatchExpired(c reqCode, at time.Time) {
	f.t.Helper()
	f.publish(events.TypeDispatchExpired, c.tenant, fmt.Sprintf("dispatch_expired:%s:%d", c.challenge, c.seq), c.challenge,
		events.DispatchExpired{ChallengeID: c.challenge, Tenant: c.tenant, RequestID: c.request, CodeSeq: c.seq,
			Attempts: 3, ExpiresAt: at, ExpiredAt: at})
}

// feedback publishes the provider's word about code c: kind, and fb's details.
func (f *statusFeed) feedback(c reqCode, kind events.FeedbackKind, at time.Time, fb events.Feedback) {
	f.t.Helper()
	fb.Tenant, fb.ChallengeID, fb.CodeSeq, fb.Kind = c.tenant, c.challenge, c.seq, kind
	fb.Provider, fb.ProviderMessageID, fb.SentAt, fb.OccurredAt, fb.ReceivedAt = "ses", "m-"+c.challenge, at, at, at
	f.publish(events.TypeFeedback, c.tenant, fmt.Sprintf("feedback:ses:%s-%d-%s", c.challenge, c.seq, kind), c.challenge, fb)
}

func (f *statusFeed) verified(c reqCode, at time.Time) {
	f.t.Helper()
	f.publish(events.TypeVerified, c.tenant, "verified:"+c.challenge, c.challenge, events.Verified{
		ChallengeID: c.challenge, Tenant: c.tenant, RequestID: c.request, CodeSeq: c.seq, Attempts: 1, VerifiedAt: at})
}

func (f *statusFeed) locked(c reqCode, at time.Time) {
	f.t.Helper()
	f.publish(events.TypeLocked, c.tenant, "locked:"+c.challenge, c.challenge, events.Locked{
		ChallengeID: c.challenge, Tenant: c.tenant, RequestID: c.request, Attempts: 5, LockedAt: at})
}

func (f *statusFeed) superseded(c reqCode, by string, at time.Time) {
	f.t.Helper()
	f.publish(events.TypeSuperseded, c.tenant, "superseded:"+c.challenge, c.challenge, events.Superseded{
		ChallengeID: c.challenge, Tenant: c.tenant, RequestID: c.request, SupersededBy: by, SupersededAt: at})
}

// erasure publishes otpflow erase's request for recipient of tenant, named by its
// subject hashes under every key of the ring.
func (f *statusFeed) erasure(tenant, recipient, id string) {
	f.t.Helper()
	f.publish(events.TypeErasureRequested, tenant, "erasure:"+id, "", events.ErasureRequested{ErasureID: id, Tenant: tenant,
		RecipientHashes: f.h.issuerRing.SubjectHashes(tenant, recipient), RequestedAt: time.Now().UTC()})
}

// drained waits until verifier-status settled everything published so far.
func (f *statusFeed) drained() {
	f.t.Helper()
	testenv.WaitDrained(f.t, f.h.js, events.StreamEvents, events.VerifierStatusConsumer.Durable, f.last, 15*time.Second)
}

// askStatus asks otp.status.<tenant> over NATS with body and returns the reply message.
func (h *harness) askStatus(t testing.TB, tenant string, body []byte) *nats.Msg {
	t.Helper()
	m, err := h.nc.Request("otp.status."+tenant, body, 5*time.Second)
	testenv.Must(t, err, "status of %s", tenant)
	return m
}

// status asks what became of tenant's request requestID and expects an answer.
func (h *harness) status(t testing.TB, tenant, requestID string) events.StatusReply {
	t.Helper()
	body, _ := json.Marshal(events.StatusRequest{RequestID: requestID})
	m := h.askStatus(t, tenant, body)
	if code := m.Header.Get(micro.ErrorCodeHeader); code != "" {
		t.Fatalf("status %s/%s: error %s %q", tenant, requestID, code, m.Header.Get(micro.ErrorHeader))
	}
	var r events.StatusReply
	testenv.Must(t, json.Unmarshal(m.Data, &r), "reply %q", m.Data)
	if r.Error != "" || r.RequestID != requestID {
		t.Fatalf("status %s/%s: %+v", tenant, requestID, r)
	}
	return r
}

// wantState is what a status reply should say.
type wantState struct {
	state  events.RequestState
	at     time.Time
	detail string
	reason events.RejectReason
	seq    int
	// refusal, when set, is the last refusal's reason.
	refusal events.RejectReason
}

func checkState(t *testing.T, r events.StatusReply, w wantState) {
	t.Helper()
	got := fmt.Sprintf("%s at %s detail %q reason %q seq %d", r.State, r.At.UTC().Format(time.RFC3339Nano), r.Detail, r.Reason, r.CodeSeq)
	want := fmt.Sprintf("%s at %s detail %q reason %q seq %d", w.state, w.at.UTC().Truncate(time.Microsecond).Format(time.RFC3339Nano), w.detail, w.reason, w.seq)
	if !r.Found || got != want {
		t.Errorf("status of %s: found %v, %s; want %s", r.RequestID, r.Found, got, want)
	}
	switch {
	case w.refusal == "" && r.LastRefusal != nil:
		t.Errorf("status of %s: last refusal %+v, want none", r.RequestID, *r.LastRefusal)
	case w.refusal != "" && (r.LastRefusal == nil || r.LastRefusal.Reason != w.refusal):
		t.Errorf("status of %s: last refusal %+v, want %s", r.RequestID, r.LastRefusal, w.refusal)
	}
}

// TestStatusEveryState drives one request into each state through the events that lead
// there, published on OTP_EVENTS as their producers publish them, and asks otp.status for
// each over NATS: the state, when it was reached, its detail or reason, and the code.
func TestStatusEveryState(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	t0 := time.Now().UTC().Add(-time.Minute)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	exp := time.Now().Add(10 * time.Minute).UTC()
	n := 0
	issue := func(request string) reqCode {
		n++
		c := reqCode{"acme", ch(900 + n), request, 1}
		f.issued(c, request+"@example.com", at(0), exp)
		return c
	}
	cases := []struct {
		name string
		// events publishes the events after the issuance of c (nil: no issuance).
		events func(c reqCode)
		want   wantState
	}{
		{"pending", func(reqCode) {}, wantState{state: events.StatePending, at: at(0), seq: 1}},
		{"sent", func(c reqCode) { f.delivered(c, at(1), false) }, wantState{state: events.StateSent, at: at(1), seq: 1}},
		{"sent unconfirmed", func(c reqCode) { f.delivered(c, at(1), true) },
			wantState{state: events.StateSent, at: at(1), detail: "unconfirmed", seq: 1}},
		{"mailbox_delivered", func(c reqCode) {
			f.delivered(c, at(1), false)
			f.feedback(c, events.FeedbackMailboxDelivered, at(2), events.Feedback{})
		}, wantState{state: events.StateMailboxDelivered, at: at(2), seq: 1}},
		{"delayed", func(c reqCode) {
			f.delivered(c, at(1), false)
			f.feedback(c, events.FeedbackDelayed, at(2), events.Feedback{DelayType: "MailboxFull"})
		}, wantState{state: events.StateDelayed, at: at(2), detail: "MailboxFull", seq: 1}},
		{"bounced", func(c reqCode) {
			f.delivered(c, at(1), false)
			f.feedback(c, events.FeedbackBounced, at(2), events.Feedback{BounceType: "Permanent", BounceSubType: "NoEmail",
				Diagnostic: "smtp; 550 5.1.1 user unknown"})
		}, wantState{state: events.StateBounced, at: at(2), detail: "Permanent/NoEmail", seq: 1}},
		{"complained", func(c reqCode) {
			f.delivered(c, at(1), false)
			f.feedback(c, events.FeedbackComplained, at(2), events.Feedback{ComplaintType: "abuse"})
		}, wantState{state: events.StateComplained, at: at(2), detail: "abuse", seq: 1}},
		{"failed to send", func(c reqCode) { f.deliveryFailed(c, "permanent: 554 message rejected", at(1)) },
			wantState{state: events.StateFailed, at: at(1), detail: "permanent (ses)", seq: 1}},
		{"failed after the provider took it", func(c reqCode) {
			f.delivered(c, at(1), false)
			f.feedback(c, events.FeedbackRejected, at(2), events.Feedback{})
		}, wantState{state: events.StateFailed, at: at(2), detail: "rejected by the provider", seq: 1}},
		{"failed with a diagnostic", func(c reqCode) {
			f.delivered(c, at(1), false)
			f.feedback(c, events.FeedbackRejected, at(2), events.Feedback{Diagnostic: "Bad content\r\nvirus"})
		}, wantState{state: events.StateFailed, at: at(2), detail: "rejected by the provider", seq: 1}},
		{"dispatch_expired", func(c reqCode) { f.dispatchExpired(c, at(1)) },
			wantState{state: events.StateDispatchExpired, at: at(1), seq: 1}},
		{"verified", func(c reqCode) { f.delivered(c, at(1), false); f.verified(c, at(3)) },
			wantState{state: events.StateVerified, at: at(3), seq: 1}},
		{"locked", func(c reqCode) { f.delivered(c, at(1), false); f.locked(c, at(3)) },
			wantState{state: events.StateLocked, at: at(3), seq: 1}},
		{"superseded", func(c reqCode) { f.delivered(c, at(1), false); f.superseded(c, "newer", at(3)) },
			wantState{state: events.StateSuperseded, at: at(3), seq: 1}},
		{"rejected", nil, wantState{state: events.StateRejected, at: at(0), reason: events.ReasonInvalidRecipient,
			detail: "not an email address"}},
		{"rejected as suppressed", nil, wantState{state: events.StateRejected, at: at(0), reason: events.ReasonSuppressed,
			detail: "the address bounced"}},
	}
	for _, tc := range cases {
		request := strings.ReplaceAll(tc.name, " ", "-")
		if tc.events == nil {
			f.rejected("acme", request, tc.want.reason, tc.want.detail, at(0))
			continue
		}
		tc.events(issue(request))
	}
	// A code whose lifetime is over, never verified: expired at its expiry, whatever was
	// stored; one that bounced keeps saying so.
	expired := reqCode{"acme", ch(990), "expired", 1}
	f.issued(expired, "expired@example.com", at(0), at(30))
	f.delivered(expired, at(1), false)
	bounced := reqCode{"acme", ch(991), "bounced-then-expired", 1}
	f.issued(bounced, "bounced@example.com", at(0), at(30))
	f.feedback(bounced, events.FeedbackBounced, at(2), events.Feedback{BounceType: "Transient", BounceSubType: "MailboxFull"})
	f.drained()

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			checkState(t, h.status(t, "acme", strings.ReplaceAll(tc.name, " ", "-")), tc.want)
		})
	}
	t.Run("expired", func(t *testing.T) {
		r := h.status(t, "acme", "expired")
		checkState(t, r, wantState{state: events.StateExpired, at: at(30), seq: 1})
		var stored string
		testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT state FROM verifier.request_status WHERE request_id = 'expired'`).Scan(&stored), "row")
		if stored != "sent" {
			t.Errorf("stored state %s, want sent: expired is decided when asked", stored)
		}
		checkState(t, h.status(t, "acme", "bounced-then-expired"),
			wantState{state: events.StateBounced, at: at(2), detail: "Transient/MailboxFull", seq: 1})
	})
	t.Run("unknown", func(t *testing.T) {
		if r := h.status(t, "acme", "never-asked"); r.Found || r.State != "" {
			t.Errorf("unknown request: %+v", r)
		}
	})
	if n := testutil.ToFloat64(h.svc.statuses.WithLabelValues("bounced")); n != 2 {
		t.Errorf("otpflow_verifier_status_requests_total{outcome=bounced} = %v, want 2", n)
	}
}

// TestStatusExpiresOnTheDatabaseClock: a sent code is answered sent until its expires_at
// passes on the database clock, then expired at that time, without any event.
func TestStatusExpiresOnTheDatabaseClock(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	var dbNow time.Time
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT now()`).Scan(&dbNow), "clock")
	c := reqCode{"acme", ch(1), "soon", 1}
	expires := dbNow.Add(2 * time.Second).UTC()
	f.issued(c, "ana@example.com", dbNow.Add(-time.Minute), expires)
	f.delivered(c, dbNow.Add(-30*time.Second), false)
	f.drained()
	if r := h.status(t, "acme", "soon"); r.State != events.StateSent {
		t.Fatalf("before its expiry: %+v, want sent", r)
	}
	testenv.Eventually(t, 10*time.Second, "the code answered expired", func() bool {
		return h.status(t, "acme", "soon").State == events.StateExpired
	})
	checkState(t, h.status(t, "acme", "soon"), wantState{state: events.StateExpired, at: expires, seq: 1})
}

// TestStatusOrdering: states only move forward for one code, whatever comes late; a
// closed challenge stays closed; a refused resend is reported beside the live challenge,
// never instead of it; a refusal before the request was issued is not; an event of an
// older code changes nothing; a delivery projected before its issuance is not lost.
func TestStatusOrdering(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	t0 := time.Now().UTC().Add(-time.Minute)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	exp := time.Now().Add(10 * time.Minute).UTC()
	type check struct {
		request string
		want    wantState
	}
	var checks []check
	n := 0
	issue := func(request string) reqCode {
		n++
		c := reqCode{"acme", ch(n), request, 1}
		f.issued(c, request+"@example.com", at(0), exp)
		return c
	}

	// A late mailbox_delivered after a bounce.
	c := issue("late-delivery")
	f.delivered(c, at(1), false)
	f.feedback(c, events.FeedbackBounced, at(3), events.Feedback{BounceType: "Permanent", BounceSubType: "General"})
	f.feedback(c, events.FeedbackMailboxDelivered, at(2), events.Feedback{})
	checks = append(checks, check{"late-delivery", wantState{state: events.StateBounced, at: at(3), detail: "Permanent/General", seq: 1}})

	// A delay reported after the mailbox took it.
	c = issue("late-delay")
	f.delivered(c, at(1), false)
	f.feedback(c, events.FeedbackMailboxDelivered, at(3), events.Feedback{})
	f.feedback(c, events.FeedbackDelayed, at(2), events.Feedback{DelayType: "TransientCommunicationFailure"})
	checks = append(checks, check{"late-delay", wantState{state: events.StateMailboxDelivered, at: at(3), seq: 1}})

	// A bounce reported after the mailbox took the mail applies (its server bounced
	// it later).
	c = issue("delivered-then-bounced")
	f.delivered(c, at(1), false)
	f.feedback(c, events.FeedbackMailboxDelivered, at(2), events.Feedback{})
	f.feedback(c, events.FeedbackBounced, at(3), events.Feedback{BounceType: "Permanent", BounceSubType: "General"})
	checks = append(checks, check{"delivered-then-bounced", wantState{state: events.StateBounced, at: at(3), detail: "Permanent/General", seq: 1}})

	// A bounce after a delay applies.
	c = issue("delay-then-bounce")
	f.delivered(c, at(1), false)
	f.feedback(c, events.FeedbackDelayed, at(2), events.Feedback{DelayType: "MailboxFull"})
	f.feedback(c, events.FeedbackBounced, at(3), events.Feedback{BounceType: "Transient", BounceSubType: "MailboxFull"})
	checks = append(checks, check{"delay-then-bounce", wantState{state: events.StateBounced, at: at(3), detail: "Transient/MailboxFull", seq: 1}})

	// A complaint about a code that was verified.
	c = issue("complained-after-verify")
	f.delivered(c, at(1), false)
	f.verified(c, at(2))
	f.feedback(c, events.FeedbackComplained, at(3), events.Feedback{ComplaintType: "abuse"})
	checks = append(checks, check{"complained-after-verify", wantState{state: events.StateVerified, at: at(2), seq: 1}})

	// A resend refused as rate_limited beside a live pending challenge, and beside a sent
	// one; the refusal never overwrites the state.
	issue("resend-too-soon-pending")
	f.rejected("acme", "resend-too-soon-pending", events.ReasonRateLimited, "resend_cooldown", at(2))
	checks = append(checks, check{"resend-too-soon-pending", wantState{state: events.StatePending, at: at(0), seq: 1, refusal: events.ReasonRateLimited}})
	c = issue("resend-too-soon-sent")
	f.delivered(c, at(1), false)
	f.rejected("acme", "resend-too-soon-sent", events.ReasonRateLimited, "resend_cooldown", at(2))
	checks = append(checks, check{"resend-too-soon-sent", wantState{state: events.StateSent, at: at(1), seq: 1, refusal: events.ReasonRateLimited}})
	// A resend refused because the address is suppressed now: beside the state too.
	c = issue("resend-suppressed")
	f.delivered(c, at(1), false)
	f.feedback(c, events.FeedbackBounced, at(2), events.Feedback{BounceType: "Permanent", BounceSubType: "General"})
	f.rejected("acme", "resend-suppressed", events.ReasonSuppressed, "bounced", at(3))
	checks = append(checks, check{"resend-suppressed", wantState{state: events.StateBounced, at: at(2), detail: "Permanent/General", seq: 1, refusal: events.ReasonSuppressed}})

	// Refused as rate_limited, then retried and issued: pending, the refusal gone.
	f.rejected("acme", "retried", events.ReasonRateLimited, "recipient_cooldown", at(0))
	n++
	f.issued(reqCode{"acme", ch(n), "retried", 1}, "retried@example.com", at(5), exp)
	checks = append(checks, check{"retried", wantState{state: events.StatePending, at: at(5), seq: 1}})

	// A resend: the new code starts over; feedback about the older code changes nothing.
	c = issue("resent")
	f.delivered(c, at(1), false)
	c2 := c
	c2.seq = 2
	f.issued(c2, "resent@example.com", at(10), exp)
	f.feedback(c, events.FeedbackBounced, at(11), events.Feedback{BounceType: "Permanent", BounceSubType: "General"})
	f.prefix = "late:" // a late copy of the first code's delivery
	f.delivered(c, at(12), false)
	f.prefix = ""
	checks = append(checks, check{"resent", wantState{state: events.StatePending, at: at(10), seq: 2}})

	// The dispatcher's report projected before the issuance (another replica's batch
	// first): the request is sent, and its issuance fills in the code's lifetime.
	n++
	early := reqCode{"acme", ch(n), "delivered-first", 1}
	f.delivered(early, at(1), false)
	f.issued(early, "early@example.com", at(0), exp)
	checks = append(checks, check{"delivered-first", wantState{state: events.StateSent, at: at(1), seq: 1}})

	// Superseded after it was verified: the earlier close is what happened.
	c = issue("verified-then-superseded")
	f.verified(c, at(2))
	f.superseded(c, "newer", at(3))
	checks = append(checks, check{"verified-then-superseded", wantState{state: events.StateVerified, at: at(2), seq: 1}})
	f.drained()

	for _, c := range checks {
		t.Run(c.request, func(t *testing.T) { checkState(t, h.status(t, "acme", c.request), c.want) })
	}
	if r := h.status(t, "acme", "delivered-first"); !r.ExpiresAt.Equal(exp.Truncate(time.Microsecond)) {
		t.Errorf("delivered-first expires at %v, want %v from its issuance", r.ExpiresAt, exp)
	}
}

// TestStatusErasureRemovesRows: an erasure deletes the person's requests (found by the
// subject hash of otp.issued), not another person's; a late event of an erased challenge
// does not bring its request back.
func TestStatusErasureRemovesRows(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	now := time.Now().UTC()
	exp := now.Add(10 * time.Minute)
	ana1, ana2 := reqCode{"acme", ch(1), "ana-1", 1}, reqCode{"acme", ch(2), "ana-2", 1}
	bob := reqCode{"acme", ch(3), "bob-1", 1}
	anaGlobex := reqCode{"globex", ch(4), "ana-globex", 1}
	f.issued(ana1, "ana@example.com", now, exp)
	f.issued(ana2, "Ana@Example.com", now, exp) // the same person, spelled otherwise
	f.issued(bob, "bob@example.com", now, exp)
	f.issued(anaGlobex, "ana@example.com", now, exp) // the same address at another tenant: another person
	f.delivered(ana1, now, false)
	f.drained()
	for _, r := range []struct{ tenant, request string }{{"acme", "ana-1"}, {"acme", "ana-2"}, {"acme", "bob-1"}, {"globex", "ana-globex"}} {
		if !h.status(t, r.tenant, r.request).Found {
			t.Fatalf("%s/%s not projected", r.tenant, r.request)
		}
	}

	f.erasure("acme", "ana@example.com", "aaaaaaaa-0000-4000-8000-000000000001")
	f.drained()
	for _, r := range []string{"ana-1", "ana-2"} {
		if got := h.status(t, "acme", r); got.Found {
			t.Errorf("%s after the erasure: %+v, want not found", r, got)
		}
	}
	if !h.status(t, "acme", "bob-1").Found || !h.status(t, "globex", "ana-globex").Found {
		t.Errorf("the erasure took another person's requests")
	}
	// Events of the erased challenges that come after: nothing comes back.
	f.delivered(ana2, now.Add(time.Second), false)
	f.verified(ana1, now.Add(2*time.Second))
	f.feedback(ana1, events.FeedbackComplained, now.Add(3*time.Second), events.Feedback{})
	f.drained()
	var rows int
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT count(*) FROM verifier.request_status WHERE request_id LIKE 'ana-_'`).Scan(&rows), "rows")
	if rows != 0 {
		t.Errorf("%d rows of the erased person after their late events", rows)
	}
}

// TestStatusTenantIsolation: a tenant is answered only about its own requests: globex
// asking for acme's request id is not found, and a request id both use is answered for
// each from its own row; feedback on globex's subject naming acme's challenge changes
// nothing of acme's.
func TestStatusTenantIsolation(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	now := time.Now().UTC()
	exp := now.Add(10 * time.Minute)
	acme := reqCode{"acme", ch(1), "acme-only", 1}
	f.issued(acme, "ana@example.com", now, exp)
	f.delivered(acme, now.Add(time.Second), false)
	shared, sharedG := reqCode{"acme", ch(2), "same-id", 1}, reqCode{"globex", ch(3), "same-id", 1}
	f.issued(shared, "ana@example.com", now, exp)
	f.issued(sharedG, "gus@example.com", now, exp)
	f.deliveryFailed(sharedG, "permanent: no such domain", now.Add(time.Second))
	// globex's feedback naming acme's challenge: nothing globex holds.
	f.feedback(reqCode{"globex", acme.challenge, "", 1}, events.FeedbackBounced, now.Add(2*time.Second),
		events.Feedback{BounceType: "Permanent", BounceSubType: "General"})
	f.drained()

	if r := h.status(t, "globex", "acme-only"); r.Found {
		t.Errorf("globex asked for acme's request: %+v, want not found", r)
	}
	checkState(t, h.status(t, "acme", "acme-only"), wantState{state: events.StateSent, at: now.Add(time.Second), seq: 1})
	checkState(t, h.status(t, "acme", "same-id"), wantState{state: events.StatePending, at: now, seq: 1})
	checkState(t, h.status(t, "globex", "same-id"), wantState{state: events.StateFailed, at: now.Add(time.Second),
		detail: "permanent (ses)", seq: 1})
}

// TestStatusBadRequests: a malformed request, or one for a subject whose tenant is not
// valid, is answered with Error bad_request, never left without an answer; a database
// failure is answered with Error internal and the micro error headers.
func TestStatusBadRequests(t *testing.T) {
	h := newHarness(t)
	for _, tc := range []struct{ name, subjectTenant, body string }{
		{"not JSON", "acme", `{"request_id":`},
		{"no request id", "acme", `{}`},
		{"unknown field", "acme", `{"request_id":"r1","recipient":"ana@example.com"}`},
		{"request id with a space", "acme", `{"request_id":"r 1"}`},
		{"request id too long", "acme", `{"request_id":"` + strings.Repeat("r", 129) + `"}`},
		{"two objects", "acme", `{"request_id":"r1"}{"request_id":"r2"}`},
		{"tenant not valid", "ac$me", `{"request_id":"r1"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := h.askStatus(t, tc.subjectTenant, []byte(tc.body))
			var r events.StatusReply
			testenv.Must(t, json.Unmarshal(m.Data, &r), "reply %q", m.Data)
			if !strings.HasPrefix(r.Error, "bad_request: ") || r.Found || m.Header.Get(micro.ErrorCodeHeader) != "" {
				t.Errorf("reply %+v (headers %v), want a bad_request answer", r, m.Header)
			}
		})
	}
	if n := testutil.ToFloat64(h.svc.statuses.WithLabelValues("bad_request")); n != 7 {
		t.Errorf("otpflow_verifier_status_requests_total{outcome=bad_request} = %v, want 7", n)
	}

	t.Run("database failure", func(t *testing.T) {
		admin := testenv.Admin(t, h.pool)
		_, err := admin.Exec(t.Context(), `ALTER TABLE verifier.request_status RENAME TO request_status_away`)
		testenv.Must(t, err, "take the table away")
		t.Cleanup(func() {
			_, err := admin.Exec(context.Background(), `ALTER TABLE verifier.request_status_away RENAME TO request_status`)
			testenv.Must(t, err, "put the table back")
		})
		m := h.askStatus(t, "acme", []byte(`{"request_id":"r1"}`))
		var r events.StatusReply
		testenv.Must(t, json.Unmarshal(m.Data, &r), "reply %q", m.Data)
		if r.Error != "internal" || m.Header.Get(micro.ErrorCodeHeader) != "500" || m.Header.Get(micro.ErrorHeader) == "" {
			t.Errorf("reply %+v (headers %v), want internal with the micro error headers", r, m.Header)
		}
	})
}

// TestStatusMalformedEvents: events the status projection cannot read go to OTP_DLQ with
// the reason, each once, and the projection goes on: the good events after them are
// projected and nothing waits for a redelivery.
func TestStatusMalformedEvents(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	now := time.Now().UTC()
	exp := now.Add(10 * time.Minute)
	victim := reqCode{"acme", ch(1), "victim", 1}
	f.issued(victim, "ana@example.com", now, exp)
	f.drained()

	want := map[string]string{} // Nats-Msg-Id → a piece of the reason
	f.publish(events.TypeIssued, "acme", "issued:not-a-uuid:1", "", events.Issued{ChallengeID: "not-a-uuid", Tenant: "acme",
		RequestID: "bad-id", CodeSeq: 1, IssuedAt: now, ExpiresAt: exp})
	want["issued:not-a-uuid:1"] = "challenge_id"
	f.publish(events.TypeDelivered, "globex", "delivered:cross-tenant", victim.challenge, events.Delivered{ChallengeID: victim.challenge,
		Tenant: "acme", RequestID: "victim", CodeSeq: 1, DeliveredAt: now})
	want["delivered:cross-tenant"] = "invalid_tenant"
	f.publish(events.TypeFeedback, "acme", "feedback:ses:unknown-kind", victim.challenge, events.Feedback{Tenant: "acme",
		ChallengeID: victim.challenge, CodeSeq: 1, Kind: "teleported", OccurredAt: now})
	want["feedback:ses:unknown-kind"] = "unknown feedback kind"
	f.publish(events.TypeRejected, "acme", "rejected:no-time", "", events.Rejected{Tenant: "acme", RequestID: "r", Reason: events.ReasonPolicy})
	want["rejected:no-time"] = "rejected_at"
	f.publish(events.TypeVerified, "acme", "verified:not-json", "", json.RawMessage(`"verified"`))
	want["verified:not-json"] = "malformed_json"
	f.publish(events.TypeDispatchExpired, "acme", "dispatch_expired:seq", victim.challenge, events.DispatchExpired{
		ChallengeID: victim.challenge, Tenant: "acme", RequestID: "victim", CodeSeq: 0, ExpiredAt: now})
	want["dispatch_expired:seq"] = "code_seq"
	f.publish(events.TypeErasureRequested, "acme", "erasure:no-hashes", "", events.ErasureRequested{
		ErasureID: "aaaaaaaa-0000-4000-8000-000000000002", Tenant: "acme", RequestedAt: now})
	want["erasure:no-hashes"] = "recipient hashes"
	// verifier-erasure refuses it too, with a dead letter of its own (on OTP_EVENTS a dead
	// letter's id names its consumer).
	shared := map[string]bool{"erasure:no-hashes": true}
	// Well-formed, but it names acme's challenge for another request.
	f.publish(events.TypeDelivered, "acme", "delivered:hijack", victim.challenge, events.Delivered{ChallengeID: victim.challenge,
		Tenant: "acme", RequestID: "hijack", CodeSeq: 1, DeliveredAt: now})
	want["delivered:hijack"] = "belongs to another request"
	// And good events after them all.
	f.delivered(victim, now.Add(time.Second), false)
	good := reqCode{"acme", ch(2), "good", 1}
	f.issued(good, "bob@example.com", now, exp)
	f.drained()

	checkState(t, h.status(t, "acme", "victim"), wantState{state: events.StateSent, at: now.Add(time.Second), seq: 1})
	checkState(t, h.status(t, "acme", "good"), wantState{state: events.StatePending, at: now, seq: 1})
	for _, r := range []struct{ tenant, request string }{{"acme", "hijack"}, {"acme", "bad-id"}, {"acme", "r"}} {
		if h.status(t, r.tenant, r.request).Found {
			t.Errorf("%s/%s was projected", r.tenant, r.request)
		}
	}

	// The dead letters, by the message id of the event each holds.
	deadLetters := func() map[string]string {
		got := map[string]string{}
		for _, m := range testenv.Messages(t, h.js, events.StreamDLQ, events.TypeDLQ.Wildcard()) {
			id := nats.Header(testenv.OpenDeadLetter(t, h.dlq, m).Header).Get(jetstream.MsgIDHeader)
			c := m.Header.Get(events.HeaderDLQConsumer)
			if c != events.VerifierStatusConsumer.Durable {
				// Another reader of OTP_EVENTS gave it up as well (an erasure request
				// without hashes): its own dead letter, under its own id.
				if !shared[id] {
					t.Fatalf("%s dead-lettered by %s", id, c)
				}
				continue
			}
			if _, dup := got[id]; dup {
				t.Fatalf("%s dead-lettered twice", id)
			}
			got[id] = m.Header.Get(events.HeaderDLQReason)
		}
		return got
	}
	var got map[string]string
	testenv.Eventually(t, 10*time.Second, "every dead letter of the status projection", func() bool {
		got = deadLetters()
		return len(got) >= len(want)
	})
	if len(got) != len(want) {
		t.Errorf("dead letters %v, want %d", got, len(want))
	}
	for id, piece := range want {
		reason, ok := got[id]
		if !ok || !strings.Contains(reason, piece) || !strings.HasPrefix(reason, "verifier-status: ") {
			t.Errorf("dead letter of %s: %q, want a reason naming %q", id, reason, piece)
		}
	}
}

// TestStatusRedeliveryIsIdempotent: every event of a request's life projected again (a
// relay after a crash publishes a copy under a new message id) leaves the rows as they
// were, not even rewritten.
func TestStatusRedeliveryIsIdempotent(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	now := time.Now().UTC()
	exp := now.Add(10 * time.Minute)
	c := reqCode{"acme", ch(1), "twice", 1}
	c2 := c
	c2.seq = 2
	life := func() {
		f.issued(c, "ana@example.com", now, exp)
		f.delivered(c, now.Add(time.Second), false)
		f.rejected("acme", "twice", events.ReasonRateLimited, "resend_cooldown", now.Add(2*time.Second))
		f.issued(c2, "ana@example.com", now.Add(3*time.Second), exp)
		f.delivered(c2, now.Add(4*time.Second), false)
		f.feedback(c2, events.FeedbackDelayed, now.Add(5*time.Second), events.Feedback{DelayType: "MailboxFull"})
		f.rejected("other", "refused", events.ReasonRisk, "ip_fanout", now)
	}
	life()
	f.drained()
	type snapshot struct {
		reply   events.StatusReply
		updated time.Time
	}
	read := func() []snapshot {
		var out []snapshot
		for _, r := range []struct{ tenant, request string }{{"acme", "twice"}, {"other", "refused"}} {
			s := snapshot{reply: h.status(t, r.tenant, r.request)}
			testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT updated_at FROM verifier.request_status WHERE tenant = $1 AND request_id = $2`,
				r.tenant, r.request).Scan(&s.updated), "updated_at")
			out = append(out, s)
		}
		return out
	}
	before := read()
	checkState(t, before[0].reply, wantState{state: events.StateDelayed, at: now.Add(5 * time.Second), detail: "MailboxFull", seq: 2})
	checkState(t, before[1].reply, wantState{state: events.StateRejected, at: now, reason: events.ReasonRisk, detail: "ip_fanout"})

	// The same events again, each under a new message id (the stream would drop an
	// exact copy as a duplicate).
	f.prefix = "again:"
	life()
	f.drained()
	after := read()
	for i := range before {
		if fmt.Sprint(before[i].reply) != fmt.Sprint(after[i].reply) || !before[i].updated.Equal(after[i].updated) {
			t.Errorf("after the copies: %+v (written %v), before %+v (written %v)", after[i].reply, after[i].updated,
				before[i].reply, before[i].updated)
		}
	}
}

// TestStatusBounceIsSeenWithinSeconds: the point of otp.status, an app telling its user
// "we could not deliver to this address" within seconds: a bounce published on
// OTP_EVENTS is answered by otp.status within 3 s.
func TestStatusBounceIsSeenWithinSeconds(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	now := time.Now().UTC()
	c := reqCode{"acme", ch(1), "signup-7f3a", 1}
	f.issued(c, "ana@example.com", now, now.Add(5*time.Minute))
	f.delivered(c, now, false)
	f.drained()
	if r := h.status(t, "acme", "signup-7f3a"); r.State != events.StateSent {
		t.Fatalf("before the bounce: %+v", r)
	}
	start := time.Now()
	f.feedback(c, events.FeedbackBounced, time.Now().UTC(), events.Feedback{BounceType: "Permanent", BounceSubType: "NoEmail"})
	testenv.Eventually(t, 3*time.Second, "otp.status answering bounced", func() bool {
		return h.status(t, "acme", "signup-7f3a").State == events.StateBounced
	})
	t.Logf("bounce answered %v after it was published", time.Since(start))
}

// TestStatusPurge: the purge deletes request states not written for the retention, and
// the erased challenges remembered as long, and keeps the rest; an event older than the
// retention makes no row (what the durable's first start reads of the stream's history).
func TestStatusPurge(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	now := time.Now().UTC()
	old, fresh := reqCode{"acme", ch(1), "old", 1}, reqCode{"acme", ch(2), "fresh", 1}
	f.issued(old, "ana@example.com", now, now.Add(time.Minute))
	f.issued(fresh, "bob@example.com", now, now.Add(time.Minute))
	// Made long ago and written since (late feedback), and two rows of an earlier
	// release, made before created_at existed: one not written for the retention.
	revived, legacyOld, legacyFresh := reqCode{"acme", ch(6), "revived", 1}, reqCode{"acme", ch(7), "legacy-old", 1},
		reqCode{"acme", ch(8), "legacy-fresh", 1}
	f.issued(revived, "eve@example.com", now, now.Add(time.Minute))
	f.issued(legacyOld, "fay@example.com", now, now.Add(time.Minute))
	f.issued(legacyFresh, "gus@example.com", now, now.Add(time.Minute))
	f.erasure("acme", "carl@example.com", "aaaaaaaa-0000-4000-8000-000000000003")
	history := reqCode{"acme", ch(5), "history", 1}
	f.issued(history, "dan@example.com", now.Add(-25*time.Hour), now.Add(-25*time.Hour+5*time.Minute))
	f.rejected("acme", "history-refused", events.ReasonPolicy, "purpose", now.Add(-25*time.Hour))
	f.drained()
	if h.status(t, "acme", "history").Found || h.status(t, "acme", "history-refused").Found {
		t.Errorf("events older than the retention made rows")
	}
	admin := testenv.Admin(t, h.pool)
	_, err := admin.Exec(t.Context(), `UPDATE verifier.request_status SET
		created_at = CASE WHEN request_id IN ('old', 'revived') THEN now() - interval '25 hours' ELSE '-infinity' END,
		updated_at = CASE WHEN request_id IN ('old', 'legacy-old') THEN now() - interval '25 hours' ELSE updated_at END
		WHERE request_id IN ('old', 'revived', 'legacy-old', 'legacy-fresh')`)
	testenv.Must(t, err, "age the rows")
	_, err = admin.Exec(t.Context(), `INSERT INTO verifier.request_status_erased (challenge_id, erased_at) VALUES ($1, now() - interval '25 hours'), ($2, now())`,
		ch(3), ch(4))
	testenv.Must(t, err, "erased challenges")
	_, err = h.svc.Purge(t.Context())
	testenv.Must(t, err, "purge")
	for request, want := range map[string]bool{"old": false, "fresh": true, "revived": true, "legacy-old": false, "legacy-fresh": true} {
		if got := h.status(t, "acme", request).Found; got != want {
			t.Errorf("after the purge: %s found %v, want %v", request, got, want)
		}
	}
	var ids []string
	rows, err := h.pool.Query(t.Context(), `SELECT challenge_id::text FROM verifier.request_status_erased ORDER BY 1`)
	testenv.Must(t, err, "erased")
	for rows.Next() {
		var id string
		testenv.Must(t, rows.Scan(&id), "scan")
		ids = append(ids, id)
	}
	if fmt.Sprint(ids) != fmt.Sprint([]string{ch(4)}) {
		t.Errorf("erased challenges after the purge: %v, want %s", ids, ch(4))
	}
}

// TestStatusRulesIgnoreOrder: replicas share the durable, so a request's events can be
// applied in any order; the rules (applyStatus) end in the same row for every order of
// each set of events below.
func TestStatusRulesIgnoreOrder(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	const c1 = "eeeeeeee-eeee-4eee-8eee-000000000001"
	ev := func(kind statusKind, seq int, state events.RequestState, s int) *statusEvent {
		e := &statusEvent{tenant: "acme", kind: kind, requestID: "r", challengeID: c1, codeSeq: seq, state: state, at: at(s)}
		switch kind {
		case statusIssued:
			e.recipientKey, e.expiresAt = "k1:ana", at(s+300)
		case statusRejected:
			e.challengeID, e.reason, e.detail = "", events.ReasonRateLimited, "resend_cooldown"
		}
		if kind == statusProgress && state != events.StateSent {
			e.requestID = "" // feedback
		}
		return e
	}
	// withDetail is e with detail d.
	withDetail := func(e *statusEvent, d string) *statusEvent { e.detail = d; return e }
	for _, tc := range []struct {
		name   string
		events []*statusEvent
		want   statusRow
	}{
		{"one code's mail", []*statusEvent{ev(statusIssued, 1, "", 0), ev(statusProgress, 1, events.StateSent, 1),
			ev(statusProgress, 1, events.StateDelayed, 2), ev(statusProgress, 1, events.StateMailboxDelivered, 3),
			ev(statusProgress, 1, events.StateBounced, 4)},
			statusRow{tenant: "acme", requestID: "r", challengeID: c1, recipientKey: "k1:ana", codeSeq: 1, state: events.StateBounced,
				stateAt: at(4), issuedAt: at(0), expiresAt: at(300)}},
		{"closed", []*statusEvent{ev(statusIssued, 1, "", 0), ev(statusProgress, 1, events.StateSent, 1),
			ev(statusClosed, 1, events.StateVerified, 2), ev(statusProgress, 1, events.StateComplained, 3),
			ev(statusClosed, 0, events.StateSuperseded, 4)},
			statusRow{tenant: "acme", requestID: "r", challengeID: c1, recipientKey: "k1:ana", codeSeq: 1, state: events.StateVerified,
				stateAt: at(2), issuedAt: at(0), expiresAt: at(300)}},
		{"a resend", []*statusEvent{ev(statusIssued, 1, "", 0), ev(statusProgress, 1, events.StateSent, 1),
			ev(statusIssued, 2, "", 10), ev(statusProgress, 1, events.StateBounced, 11)},
			statusRow{tenant: "acme", requestID: "r", challengeID: c1, recipientKey: "k1:ana", codeSeq: 2, state: events.StatePending,
				stateAt: at(10), issuedAt: at(10), expiresAt: at(310)}},
		{"refused, then issued", []*statusEvent{ev(statusRejected, 0, "", 0), ev(statusIssued, 1, "", 5)},
			statusRow{tenant: "acme", requestID: "r", challengeID: c1, recipientKey: "k1:ana", codeSeq: 1, state: events.StatePending,
				stateAt: at(5), issuedAt: at(5), expiresAt: at(305)}},
		{"a refused resend", []*statusEvent{ev(statusIssued, 1, "", 0), ev(statusProgress, 1, events.StateSent, 1),
			ev(statusRejected, 0, "", 2)},
			statusRow{tenant: "acme", requestID: "r", challengeID: c1, recipientKey: "k1:ana", codeSeq: 1, state: events.StateSent,
				stateAt: at(1), issuedAt: at(0), expiresAt: at(300), refusalReason: events.ReasonRateLimited,
				refusalDetail: "resend_cooldown", refusalAt: at(2)}},
		// Outcomes of one rank (and one outcome twice): the latest is the code's state,
		// whichever replica's batch commits first.
		{"outcomes of one rank", []*statusEvent{ev(statusIssued, 1, "", 0), ev(statusProgress, 1, events.StateSent, 1),
			withDetail(ev(statusProgress, 1, events.StateFailed, 3), "transient (smtp)"),
			withDetail(ev(statusProgress, 1, events.StateBounced, 4), "Transient/MailboxFull"),
			withDetail(ev(statusProgress, 1, events.StateComplained, 5), "abuse"),
			withDetail(ev(statusProgress, 1, events.StateBounced, 6), "Permanent/General")},
			statusRow{tenant: "acme", requestID: "r", challengeID: c1, recipientKey: "k1:ana", codeSeq: 1, state: events.StateBounced,
				stateAt: at(6), detail: "Permanent/General", issuedAt: at(0), expiresAt: at(300)}},
		// At one time, the fixed order of the states decides, then the detail.
		{"outcomes at one time", []*statusEvent{ev(statusIssued, 1, "", 0),
			ev(statusProgress, 1, events.StateDispatchExpired, 4), withDetail(ev(statusProgress, 1, events.StateFailed, 4), "permanent (ses)"),
			withDetail(ev(statusProgress, 1, events.StateComplained, 4), "abuse"),
			withDetail(ev(statusProgress, 1, events.StateBounced, 4), "Permanent/General"),
			withDetail(ev(statusProgress, 1, events.StateBounced, 4), "Permanent/NoEmail")},
			statusRow{tenant: "acme", requestID: "r", challengeID: c1, recipientKey: "k1:ana", codeSeq: 1, state: events.StateBounced,
				stateAt: at(4), detail: "Permanent/NoEmail", issuedAt: at(0), expiresAt: at(300)}},
		{"closes at one time", []*statusEvent{ev(statusIssued, 1, "", 0), ev(statusClosed, 1, events.StateSuperseded, 3),
			ev(statusClosed, 1, events.StateLocked, 3), ev(statusClosed, 1, events.StateVerified, 3)},
			statusRow{tenant: "acme", requestID: "r", challengeID: c1, recipientKey: "k1:ana", codeSeq: 1, state: events.StateVerified,
				stateAt: at(3), issuedAt: at(0), expiresAt: at(300)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			orders := 0
			permute(tc.events, func(order []*statusEvent) {
				orders++
				// Feedback finds the row by its challenge: before there is one, it is
				// delivered again, after the rest (projectStatus, statusOrphanDeliveries).
				var r *statusRow
				var later []*statusEvent
				apply := func(e *statusEvent) {
					if e.requestID == "" && r == nil {
						later = append(later, e)
						return
					}
					r = applyStatus(r, e)
				}
				for _, e := range order {
					apply(e)
				}
				again := later
				later = nil
				for _, e := range again {
					apply(e)
				}
				if r == nil || !r.same(&tc.want) {
					t.Fatalf("in the order %s: %+v, want %+v", orderName(order), r, tc.want)
				}
			})
			t.Logf("%d orders", orders)
		})
	}
}

// permute calls f with every order of es.
func permute(es []*statusEvent, f func([]*statusEvent)) {
	var rec func(k int)
	rec = func(k int) {
		if k == len(es) {
			f(es)
			return
		}
		for i := k; i < len(es); i++ {
			es[k], es[i] = es[i], es[k]
			rec(k + 1)
			es[k], es[i] = es[i], es[k]
		}
	}
	rec(0)
}

func orderName(es []*statusEvent) string {
	var parts []string
	for _, e := range es {
		parts = append(parts, fmt.Sprintf("%d/%d/%s", e.kind, e.codeSeq, e.state))
	}
	return strings.Join(parts, ", ")
}

// TestStatusFeedbackBeforeItsRequest: feedback names only its challenge. Projected before
// the events that make its request's row (another replica's batch), it is delivered again
// and then applied; about a challenge no row will ever hold, it is acknowledged after its
// tries (their delays shortened here), counted as dropped, and makes nothing.
func TestStatusFeedbackBeforeItsRequest(t *testing.T) {
	t.Run("applied once its request is", func(t *testing.T) {
		h := newHarness(t)
		f := h.statusFeed(t)
		now := time.Now().UTC()
		c := reqCode{"acme", ch(1), "slow", 1}
		f.feedback(c, events.FeedbackBounced, now.Add(2*time.Second), events.Feedback{BounceType: "Permanent", BounceSubType: "General"})
		testenv.Eventually(t, 10*time.Second, "the feedback put back for its request", func() bool {
			return testutil.ToFloat64(h.svc.statusEvents.WithLabelValues("retried")) >= 1
		})
		f.issued(c, "ana@example.com", now, now.Add(5*time.Minute))
		f.delivered(c, now.Add(time.Second), false)
		testenv.Eventually(t, 10*time.Second, "the bounce applied", func() bool {
			return h.status(t, "acme", "slow").State == events.StateBounced
		})
		f.drained()
		checkState(t, h.status(t, "acme", "slow"), wantState{state: events.StateBounced, at: now.Add(2 * time.Second),
			detail: "Permanent/General", seq: 1})
	})
	t.Run("dropped when no request holds it", func(t *testing.T) {
		h := newConfigHarness(t, "", nil, func(c *Config) { c.orphanDelay = 20 * time.Millisecond })
		f := h.statusFeed(t)
		f.feedback(reqCode{"acme", ch(2), "", 1}, events.FeedbackComplained, time.Now().UTC(), events.Feedback{})
		f.drained()
		if n := testutil.ToFloat64(h.svc.statusEvents.WithLabelValues("retried")); n != statusOrphanDeliveries-1 {
			t.Errorf("delivered again %v times, want %d", n, statusOrphanDeliveries-1)
		}
		if n := testutil.ToFloat64(h.svc.statusEvents.WithLabelValues("orphan_dropped")); n != 1 {
			t.Errorf("otpflow_verifier_status_events_total{outcome=orphan_dropped} = %v, want 1", n)
		}
		var rows int
		testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT count(*) FROM verifier.request_status`).Scan(&rows), "rows")
		if rows != 0 {
			t.Errorf("%d rows from feedback about nothing", rows)
		}
	})
}

// TestStatusOrphanRetriesOutlastARedelivery: feedback whose challenge no row holds is
// delivered again for longer than the issuance before it can take to come back when its
// batch failed or its replica crashed (the durable's AckWait, then the consumer's longest
// retry delay, platform.ConsumeConfig's default 30 s), several times over, and within
// the durable's MaxDeliver.
func TestStatusOrphanRetriesOutlastARedelivery(t *testing.T) {
	var total time.Duration
	for n := uint64(1); n < statusOrphanDeliveries; n++ {
		total += platform.RetryDelay(n, defaultOrphanDelay)
	}
	comeBack := events.VerifierStatusConsumer.AckWait + 30*time.Second
	if total < 4*comeBack || total > 10*time.Minute {
		t.Errorf("orphan feedback retried for %v, want at least %v (and within 10 min)", total, 4*comeBack)
	}
	if limit := events.VerifierStatusConsumer.MaxDeliver; statusOrphanDeliveries >= limit {
		t.Errorf("%d deliveries of orphan feedback, the durable allows %d", statusOrphanDeliveries, limit)
	}
	t.Logf("orphan feedback delivered %d times over %v", statusOrphanDeliveries, total)
}

// TestStatusNeverHoldsVerify: otp.status has slots of its own and never waits for one.
// With every status slot held by a call whose read has not finished, the calls beyond
// them, as many as verify's slots, are answered busy at once (code 503), and a verify is
// answered: status calls cannot take its slots.
func TestStatusNeverHoldsVerify(t *testing.T) {
	const verifySlots, statusSlots = 4, 2
	held, release := make(chan struct{}, 2*verifySlots), make(chan struct{})
	h := newConfigHarness(t, "", nil, func(c *Config) {
		c.Concurrency, c.StatusConcurrency = verifySlots, statusSlots
		c.beforeStatus = func() { held <- struct{}{}; <-release }
	})
	t.Cleanup(func() { close(release) }) // before the service stops (cleanups run last first)
	h.issue(t, ch(1), "v1", 1, "123456", "", time.Now().Add(5*time.Minute))

	replies := make(chan *nats.Msg, verifySlots)
	for range verifySlots {
		go func() {
			m, err := h.nc.Request("otp.status.acme", []byte(`{"request_id":"r1"}`), 30*time.Second)
			if err != nil {
				m = &nats.Msg{Data: []byte(err.Error())}
			}
			replies <- m
		}()
	}
	for range statusSlots {
		select {
		case <-held:
		case <-time.After(10 * time.Second):
			t.Fatal("the status slots were not taken")
		}
	}
	for range verifySlots - statusSlots {
		select {
		case m := <-replies:
			var r events.StatusReply
			if err := json.Unmarshal(m.Data, &r); err != nil || r.Error != "busy" || m.Header.Get(micro.ErrorCodeHeader) != "503" {
				t.Fatalf("a status call beyond the slots: %q (headers %v), want busy with code 503", m.Data, m.Header)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a status call beyond the slots was not answered: it waits for a slot")
		}
	}
	if r := h.verify(t, "v1", "123456", ""); r.Status != events.StatusVerified {
		t.Fatalf("verify while status holds its slots: %+v", r)
	}
	if len(held) != 0 {
		t.Fatalf("%d more status calls ran than there are status slots", len(held))
	}
	if n := testutil.ToFloat64(h.svc.statuses.WithLabelValues("busy")); n != verifySlots-statusSlots {
		t.Errorf("otpflow_verifier_status_requests_total{outcome=busy} = %v, want %d", n, verifySlots-statusSlots)
	}
}

// TestStatusTenantPace: a tenant's status calls beyond its pace are answered
// rate_limited (code 429) without a read; another tenant's are answered.
func TestStatusTenantPace(t *testing.T) {
	h := newConfigHarness(t, "", nil, func(c *Config) { c.StatusTenantPerMinute = 1 }) // one at once, the next in a minute
	if r := h.status(t, "acme", "r1"); r.Found {
		t.Fatalf("first call: %+v", r)
	}
	m := h.askStatus(t, "acme", []byte(`{"request_id":"r1"}`))
	var r events.StatusReply
	testenv.Must(t, json.Unmarshal(m.Data, &r), "reply %q", m.Data)
	if r.Error != "rate_limited" || m.Header.Get(micro.ErrorCodeHeader) != "429" {
		t.Errorf("acme's second call: %+v (headers %v), want rate_limited with code 429", r, m.Header)
	}
	if r := h.status(t, "globex", "r1"); r.Found {
		t.Errorf("globex's call: %+v", r)
	}
	if n := testutil.ToFloat64(h.svc.statuses.WithLabelValues("rate_limited")); n != 1 {
		t.Errorf("otpflow_verifier_status_requests_total{outcome=rate_limited} = %v, want 1", n)
	}
}

// TestStatusEraseIsImmediate: Service.Erase, which verifier-erasure runs before otp.erased
// answers, deletes the person's status rows in its own transaction, whether or not the
// status projection ever reads the erasure (here it never does: no otp.erasure_requested
// is published): rows named by the person's subject hash, and a row a delivery made
// before its issuance, found by the person's challenge. It remembers the person's
// challenges, those of the status rows and those only the challenge projection holds, so
// copies of their events projected later (a relay, a redelivery) make no row again.
// Another person's row stays.
func TestStatusEraseIsImmediate(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	now := time.Now().UTC()
	exp := now.Add(10 * time.Minute)
	ana, bob := reqCode{"acme", ch(1), "ana-1", 1}, reqCode{"acme", ch(2), "bob-1", 1}
	f.issued(ana, "ana@example.com", now, exp)
	f.delivered(ana, now.Add(time.Second), false)
	f.issued(bob, "bob@example.com", now, exp)
	// Ana's code whose otp.delivered was projected, its otp.issued not yet: the row holds
	// no subject hash.
	early := reqCode{"acme", ch(3), "ana-early", 1}
	h.publishIssued(t, issue{ChallengeID: early.challenge, RequestID: early.request, CodeSeq: 1, Recipient: "ana@example.com",
		ExpiresAt: exp}, "123456")
	h.waitProjected(t, early.challenge, 1)
	f.delivered(early, now.Add(time.Second), false)
	// Ana's code the status projection has seen nothing of yet.
	unseen := reqCode{"acme", ch(4), "ana-unseen", 1}
	h.publishIssued(t, issue{ChallengeID: unseen.challenge, RequestID: unseen.request, CodeSeq: 1, Recipient: "ana@example.com",
		ExpiresAt: exp}, "654321")
	h.waitProjected(t, unseen.challenge, 1)
	f.drained()
	for _, r := range []string{"ana-1", "ana-early", "bob-1"} {
		if !h.status(t, "acme", r).Found {
			t.Fatalf("%s not projected", r)
		}
	}

	n, err := h.svc.Erase(t.Context(), events.ErasureRequested{ErasureID: "aaaaaaaa-0000-4000-8000-000000000004", Tenant: "acme",
		RecipientHashes: h.subjects.SubjectHashes("acme", "ana@example.com"), RequestedAt: now})
	testenv.Must(t, err, "erase")
	for _, r := range []string{"ana-1", "ana-early"} {
		if got := h.status(t, "acme", r); got.Found {
			t.Errorf("%s right after the erasure: %+v, want not found", r, got)
		}
	}
	if !h.status(t, "acme", "bob-1").Found {
		t.Errorf("the erasure took bob's request")
	}
	if n != 6 { // 2 status rows, 2 codes, 2 challenges
		t.Errorf("erased %d rows, want 6", n)
	}

	// Copies of ana's events, under new message ids: her deliveries and a verification,
	// then her issuance.
	f.prefix = "again:"
	anaRows := func(after string) {
		t.Helper()
		f.drained()
		var rows []string
		r, err := h.pool.Query(t.Context(), `SELECT request_id FROM verifier.request_status WHERE request_id LIKE 'ana-%' ORDER BY 1`)
		testenv.Must(t, err, "rows")
		for r.Next() {
			var id string
			testenv.Must(t, r.Scan(&id), "row")
			rows = append(rows, id)
		}
		if len(rows) != 0 {
			t.Errorf("rows of the erased person after copies of %s: %v", after, rows)
		}
	}
	f.delivered(ana, now.Add(time.Second), false)
	f.delivered(early, now.Add(time.Second), false)
	f.delivered(unseen, now.Add(time.Second), false)
	f.verified(unseen, now.Add(2*time.Second))
	anaRows("her deliveries")
	f.issued(ana, "ana@example.com", now, exp)
	anaRows("her issuance")
}

// TestStatusSkipsHistory: the durable's first start reads OTP_EVENTS from its beginning
// (kept 400 days): an event the stream stored before the retention cutoff is
// acknowledged unread, so an old event this release cannot decode is not dead-lettered.
// The cutoff is on the database clock: with the process clock a day ahead, a current
// malformed event is still read, and dead-lettered.
func TestStatusSkipsHistory(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	h.clock.set(time.Now().Add(25 * time.Hour))
	f.publish(events.TypeVerified, "acme", "verified:current-not-json", "", json.RawMessage(`"verified"`))
	f.drained()
	statusDeadLetters := func() int {
		n := 0
		for _, m := range testenv.Messages(t, h.js, events.StreamDLQ, events.TypeDLQ.Wildcard()) {
			if m.Header.Get(events.HeaderDLQConsumer) == events.VerifierStatusConsumer.Durable {
				n++
			}
		}
		return n
	}
	if n := statusDeadLetters(); n != 1 {
		t.Fatalf("%d dead letters of a current malformed event, want 1", n)
	}

	// The projection down while an event is stored, and up again once the event is older
	// than the retention (a second, here) on the database clock.
	h.stops[0]()
	f.publish(events.TypeVerified, "acme", "verified:old-not-json", "", json.RawMessage(`"verified"`))
	st, err := h.js.Stream(t.Context(), events.StreamEvents)
	testenv.Must(t, err, "stream")
	m, err := st.GetMsg(t.Context(), f.last)
	testenv.Must(t, err, "stored event")
	testenv.Eventually(t, 10*time.Second, "the event older than the retention on the database clock", func() bool {
		return h.dbNow(t).After(m.Time.Add(time.Second))
	})
	h.svc, h.clock = h.replica(t, "", nil, func(c *Config) { c.Retention = time.Second })
	f.drained()
	if n := statusDeadLetters(); n != 1 {
		t.Errorf("%d dead letters after the old malformed event, want 1: it was read", n)
	}
	if n := testutil.ToFloat64(h.svc.statusEvents.WithLabelValues("before_retention")); n != 1 {
		t.Errorf("otpflow_verifier_status_events_total{outcome=before_retention} = %v, want 1", n)
	}
}

// TestStatusFailureDetailIsClassified: an app is told how a delivery failed, permanent or
// transient and with which provider, never the provider's text (SDK and SMTP errors name
// accounts, resources and relay hosts); a code the provider took and then refused is
// "rejected by the provider", without its diagnostic. None of that text is stored.
func TestStatusFailureDetailIsClassified(t *testing.T) {
	h := newHarness(t)
	f := h.statusFeed(t)
	now := time.Now().UTC()
	exp := now.Add(10 * time.Minute)
	secrets := []string{"123456789012", "arn:aws", "relay.corp.internal", "AccessDenied"}
	cases := []struct {
		name   string
		event  func(c reqCode)
		detail string
	}{
		{"permanent", func(c reqCode) {
			f.deliveryFailedAs(c, events.DeliveryFailed{Provider: "ses", Permanent: true, FailedAt: now,
				Reason: "operation error SESv2: SendEmail, AccessDeniedException: arn:aws:iam::123456789012:user/otp is not authorized"})
		}, "permanent (ses)"},
		{"transient", func(c reqCode) {
			f.deliveryFailedAs(c, events.DeliveryFailed{Provider: "smtp", FailedAt: now,
				Reason: events.DeliveryReasonExhausted + ": dial tcp relay.corp.internal:587: connection refused"})
		}, "transient (smtp)"},
		{"provider not a name", func(c reqCode) {
			f.deliveryFailedAs(c, events.DeliveryFailed{Provider: "relay.corp.internal", Permanent: true, FailedAt: now,
				Reason: "550 relay.corp.internal says no"})
		}, "permanent"},
		{"rejected after it was taken", func(c reqCode) {
			f.delivered(c, now, false)
			f.feedback(c, events.FeedbackRejected, now.Add(time.Second), events.Feedback{
				Diagnostic: "554 relay.corp.internal: arn:aws:ses:eu-west-1:123456789012:identity/example.com rejected"})
		}, "rejected by the provider"},
	}
	for i, tc := range cases {
		c := reqCode{"acme", ch(i + 1), strings.ReplaceAll(tc.name, " ", "-"), 1}
		f.issued(c, "ana@example.com", now, exp)
		tc.event(c)
	}
	f.drained()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := h.status(t, "acme", strings.ReplaceAll(tc.name, " ", "-"))
			if r.State != events.StateFailed || r.Detail != tc.detail {
				t.Errorf("%s %q, want failed %q", r.State, r.Detail, tc.detail)
			}
		})
	}
	dump, _ := testenv.DumpSchema(t, h.pool, Schema)
	testenv.AssertNoPlaintext(t, dump, secrets...)
}

// TestStatusUpdatesAreHeapOnly: as a request's code is sent and then verified, its
// status row is updated in place (heap-only, HOT), writing no index entry: no indexed
// column changes, and the row's page has room for its next version (migrations 00008 and
// 00009). Each step is one batch of 600 requests, one transaction: the most a page's rows
// can be written again at once. Counted by PostgreSQL's statistics of each transaction.
// With updated_at indexed, as before, no update is heap-only; with full pages, few are.
func TestStatusUpdatesAreHeapOnly(t *testing.T) {
	pool := testenv.Postgres(t, Spec())
	conn, err := pool.Acquire(t.Context())
	testenv.Must(t, err, "connection")
	defer conn.Release()
	const n = 600
	now := time.Now().UTC().Truncate(time.Microsecond)
	step := func(name string, event func(i int) *statusEvent) (updates, heapOnly int64) {
		t.Helper()
		items := make([]*statusEvent, n)
		for i := range items {
			items[i] = event(i)
		}
		tx, err := conn.Begin(t.Context())
		testenv.Must(t, err, "begin")
		defer func() { _ = tx.Rollback(context.Background()) }()
		// The backend's counts not yet reported, this transaction's among them: the
		// difference is this transaction's.
		counts := func() (updates, heapOnly int64) {
			testenv.Must(t, tx.QueryRow(t.Context(), `SELECT coalesce(n_tup_upd, 0), coalesce(n_tup_hot_upd, 0)
				FROM pg_stat_xact_user_tables WHERE relid = 'verifier.request_status'::regclass`).Scan(&updates, &heapOnly),
				"%s: statistics", name)
			return updates, heapOnly
		}
		updates0, heapOnly0 := counts()
		testenv.Must(t, projectStatusInTx(t.Context(), tx, items, 24*time.Hour), "%s: project", name)
		updates, heapOnly = counts()
		testenv.Must(t, tx.Commit(t.Context()), "%s: commit", name)
		return updates - updates0, heapOnly - heapOnly0
	}
	id := func(i int) (string, string) {
		return fmt.Sprintf("dddddddd-dddd-4ddd-8ddd-%012d", i), fmt.Sprintf("hot-%d", i)
	}
	step("issued", func(i int) *statusEvent {
		c, r := id(i)
		return &statusEvent{tenant: "acme", kind: statusIssued, requestID: r, challengeID: c, codeSeq: 1, at: now,
			expiresAt: now.Add(5 * time.Minute), recipientKey: fmt.Sprintf("id:%043d", i)}
	})
	for _, s := range []struct {
		name  string
		kind  statusKind
		state events.RequestState
	}{{"sent", statusProgress, events.StateSent}, {"verified", statusClosed, events.StateVerified}} {
		updates, heapOnly := step(s.name, func(i int) *statusEvent {
			c, r := id(i)
			return &statusEvent{tenant: "acme", kind: s.kind, requestID: r, challengeID: c, codeSeq: 1, state: s.state, at: now}
		})
		if updates != n {
			t.Errorf("%s: %d updates, want %d", s.name, updates, n)
		}
		if heapOnly*10 < updates*9 {
			t.Errorf("%s: %d of %d updates were heap-only, want at least 90 %%", s.name, heapOnly, updates)
		}
		t.Logf("%s: %d of %d updates heap-only", s.name, heapOnly, updates)
	}
	var state string
	testenv.Must(t, pool.QueryRow(t.Context(), `SELECT state FROM verifier.request_status WHERE request_id = 'hot-599'`).Scan(&state), "state")
	if state != string(events.StateVerified) {
		t.Errorf("the last request's state %q, want verified", state)
	}
}

// TestStatusPurgeScansItsIndex: each purge statement finds its rows by a range scan of
// request_status_created, which stops at the statement's limit, and deletes them where
// they are (ctid): no plan, custom or generic (what a prepared statement comes to), reads
// the whole table.
func TestStatusPurgeScansItsIndex(t *testing.T) {
	pool := testenv.Postgres(t, Spec())
	admin := testenv.Admin(t, pool)
	_, err := admin.Exec(t.Context(), `INSERT INTO verifier.request_status (tenant, request_id, challenge_id, state, state_at, created_at, updated_at)
		SELECT 'acme', 'r-' || i, gen_random_uuid(), 'sent', now(), now() - i * interval '1 second', now() - i * interval '1 second'
		FROM generate_series(1, 20000) AS i;
		ANALYZE verifier.request_status`)
	testenv.Must(t, err, "rows")
	for i, mode := range []string{"force_custom_plan", "force_generic_plan"} {
		plan := func() string {
			tx, err := admin.Begin(t.Context())
			testenv.Must(t, err, "begin")
			defer func() { _ = tx.Rollback(context.Background()) }()
			_, err = tx.Exec(t.Context(), `SET LOCAL plan_cache_mode = `+mode)
			testenv.Must(t, err, "plan cache mode")
			name := fmt.Sprintf("purge_status_%d", i)
			_, err = tx.Exec(t.Context(), `PREPARE `+name+` (bigint, int) AS `+purgeStatusSQL)
			testenv.Must(t, err, "prepare")
			rows, err := tx.Query(t.Context(), `EXPLAIN EXECUTE `+name+` (86400000000, 5000)`)
			testenv.Must(t, err, "explain")
			lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
			testenv.Must(t, err, "plan")
			return strings.Join(lines, "\n")
		}()
		if !strings.Contains(plan, "Index Scan using request_status_created") || !strings.Contains(plan, "Tid Scan") ||
			strings.Contains(plan, "Seq Scan") ||
			strings.Contains(plan, "Bitmap") {
			t.Errorf("%s: the purge does not stop at its limit on request_status_created:\n%s", mode, plan)
		}
	}
}

// TestStatusPurgeInBatches: the purge deletes old status rows and erased challenges in
// statements of a bounded size (shortened here), until none is left; the lookups of the
// erasure and of the purge have their indexes.
func TestStatusPurgeInBatches(t *testing.T) {
	h := newHarness(t)
	h.svc.store.purgeBatch = 3 // read only by Purge, called below
	admin := testenv.Admin(t, h.pool)
	_, err := admin.Exec(t.Context(), `INSERT INTO verifier.request_status (tenant, request_id, challenge_id, state, state_at, created_at, updated_at)
		SELECT 'acme', 'old-' || i, gen_random_uuid(), 'sent', now(), now() - interval '26 hours', now() - interval '25 hours' FROM generate_series(1, 7) AS i
		UNION ALL SELECT 'acme', 'fresh-' || i, gen_random_uuid(), 'sent', now(), now(), now() FROM generate_series(1, 2) AS i`)
	testenv.Must(t, err, "status rows")
	_, err = admin.Exec(t.Context(), `INSERT INTO verifier.request_status_erased (challenge_id, erased_at)
		SELECT gen_random_uuid(), now() - interval '25 hours' FROM generate_series(1, 7)
		UNION ALL SELECT gen_random_uuid(), now()`)
	testenv.Must(t, err, "erased challenges")
	// Each statement's deletions of status rows, as the database saw them.
	_, err = admin.Exec(t.Context(), `CREATE TABLE public.purge_log (at timestamptz DEFAULT clock_timestamp(), n bigint);
		CREATE FUNCTION public.log_purge() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS
			$$ BEGIN INSERT INTO public.purge_log (n) SELECT count(*) FROM old; RETURN NULL; END $$;
		CREATE TRIGGER log_purge AFTER DELETE ON verifier.request_status REFERENCING OLD TABLE AS old
			FOR EACH STATEMENT EXECUTE FUNCTION public.log_purge()`)
	testenv.Must(t, err, "statement log")
	_, err = h.svc.Purge(t.Context())
	testenv.Must(t, err, "purge")
	var statements []int64
	testenv.Must(t, admin.QueryRow(t.Context(), `SELECT coalesce(array_agg(n ORDER BY at), '{}') FROM public.purge_log`).Scan(&statements), "log")
	if fmt.Sprint(statements) != "[3 3 1]" {
		t.Errorf("status rows deleted per statement %v, want [3 3 1]", statements)
	}
	var rows, erased int
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT (SELECT count(*) FROM verifier.request_status),
		(SELECT count(*) FROM verifier.request_status_erased)`).Scan(&rows, &erased), "count")
	if rows != 2 || erased != 1 {
		t.Errorf("after the purge %d status rows and %d erased challenges, want the 2 and 1 fresh ones", rows, erased)
	}

	defs := map[string]bool{}
	idx, err := h.pool.Query(t.Context(), `SELECT tablename || ' ' || substring(indexdef from '\(.*\)$') FROM pg_indexes WHERE schemaname = 'verifier'`)
	testenv.Must(t, err, "indexes")
	for idx.Next() {
		var d string
		testenv.Must(t, idx.Scan(&d), "index")
		defs[d] = true
	}
	for _, want := range []string{"request_status (tenant, recipient_key)", "request_status (created_at)", "request_status_erased (erased_at)"} {
		if !defs[want] {
			t.Errorf("no index %s; have %v", want, defs)
		}
	}
}
