package issuer

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/testenv"
)

// feedback publishes otp.feedback.<tenant> as the dispatcher does, about a mail to address.
func (h *harness) feedback(t *testing.T, id, tenant, address string, kind events.FeedbackKind, bounceType string) {
	t.Helper()
	h.feedbackAt(t, id, tenant, address, kind, bounceType, time.Now().UTC())
}

// feedbackAt is feedback about a bounce or a complaint that happened at now.
func (h *harness) feedbackAt(t *testing.T, id, tenant, address string, kind events.FeedbackKind, bounceType string, now time.Time) {
	t.Helper()
	f := events.Feedback{Tenant: tenant, ChallengeID: uuid.NewString(), CodeSeq: 1, Kind: kind, RecipientHash: h.subjects.Subject(tenant, address),
		Provider: "ses", ProviderMessageID: "ses-" + id, BounceType: bounceType, SentAt: now, OccurredAt: now, ReceivedAt: now}
	m, err := events.NewMsg(events.TypeFeedback, tenant, "feedback:ses:"+id, f.ChallengeID, f, events.Envelope{Source: "otpflow/dispatcher", Time: now})
	testenv.Must(t, err, "feedback")
	_, err = h.js.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish feedback")
}

// requestOf publishes otp.requested.<tenant>.
func (h *harness) requestOf(t *testing.T, tenant, requestID, address string, resend bool) {
	t.Helper()
	body := fmt.Sprintf(`{"request_id":%q,"recipient":%q,"purpose":"login","resend":%v}`, requestID, address, resend)
	_, err := h.js.Publish(context.Background(), "otp.requested."+tenant, []byte(body))
	testenv.Must(t, err, "publish")
}

// outcome waits for the issuer's answer to requestID of tenant: the otp.rejected, or nil
// once it is issued.
func (h *harness) outcome(t *testing.T, tenant, requestID string) *events.Rejected {
	t.Helper()
	var rej *events.Rejected
	testenv.Eventually(t, 10*time.Second, "the answer to "+requestID, func() bool {
		for _, m := range testenv.Messages(t, h.js, events.StreamEvents, "otp.rejected."+tenant) {
			if r := decode[events.Rejected](t, m); r.RequestID == requestID {
				rej = &r
				return true
			}
		}
		for _, m := range testenv.Messages(t, h.js, events.StreamEvents, "otp.issued."+tenant) {
			if decode[events.Issued](t, m).RequestID == requestID {
				return true
			}
		}
		return false
	})
	return rej
}

func (h *harness) suppressions(t *testing.T) int {
	t.Helper()
	var n int
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT count(*) FROM issuer.suppressions`).Scan(&n), "count")
	return n
}

func wantSuppressed(t *testing.T, rej *events.Rejected, requestID, limit string) {
	t.Helper()
	if rej == nil || rej.Reason != events.ReasonSuppressed || rej.Limit != limit {
		t.Fatalf("%s: %+v, want refused as suppressed (%s)", requestID, rej, limit)
	}
	if rej.RetryAfterSeconds != 0 || strings.Contains(rej.Detail, "@") {
		t.Fatalf("%s: rejection %+v", requestID, rej)
	}
}

// TestBounceAndComplaintSuppressTheRecipient: a permanent bounce and a complaint put their
// recipient on the tenant's suppression list; a later request for them, in any spelling,
// as a new challenge or as a resend, and after a key rotation, is refused with reason
// suppressed and no code is made. A transient bounce, a delay and a mailbox delivery list
// nobody, another tenant's same address is not listed, and an erasure takes the entry off.
func TestBounceAndComplaintSuppressTheRecipient(t *testing.T) {
	h := newHarness(t)
	h.requestOf(t, "acme", "r-ana", "ana@example.com", false)
	if rej := h.outcome(t, "acme", "r-ana"); rej != nil {
		t.Fatalf("r-ana: %+v", rej)
	}

	h.feedback(t, "1", "acme", "ana@example.com", events.FeedbackBounced, "Permanent")
	h.feedback(t, "2", "acme", "cy@example.com", events.FeedbackComplained, "")
	h.feedback(t, "3", "acme", "bo@example.com", events.FeedbackBounced, "Transient")
	h.feedback(t, "4", "acme", "dee@example.com", events.FeedbackDelayed, "")
	h.feedback(t, "5", "acme", "eve@example.com", events.FeedbackMailboxDelivered, "")
	h.feedback(t, "1", "acme", "ana@example.com", events.FeedbackBounced, "Permanent") // a repeat, dropped by the stream
	testenv.Eventually(t, 10*time.Second, "the feedback read", func() bool {
		info, err := h.js.Consumer(context.Background(), events.StreamEvents, events.IssuerFeedbackConsumer.Durable)
		testenv.Must(t, err, "consumer")
		ci, err := info.Info(context.Background())
		testenv.Must(t, err, "consumer info")
		return ci.Delivered.Stream > 0 && ci.NumAckPending == 0 && ci.NumPending == 0
	})
	if n := h.suppressions(t); n != 2 {
		t.Fatalf("%d entries, want ana's (bounced) and cy's (complained)", n)
	}

	h.advance(2 * time.Minute) // past ana's cooldown: only the list can refuse her
	h.requestOf(t, "acme", "r-ana2", "ANA@Example.com", false)
	wantSuppressed(t, h.outcome(t, "acme", "r-ana2"), "r-ana2", SuppressedBounced)
	h.requestOf(t, "acme", "r-ana", "ana@example.com", true)
	testenv.Eventually(t, 10*time.Second, "the resend refused", func() bool {
		return len(testenv.Messages(t, h.js, events.StreamEvents, "otp.rejected.acme")) >= 2
	})
	for _, m := range testenv.Messages(t, h.js, events.StreamEvents, "otp.rejected.acme") {
		if r := decode[events.Rejected](t, m); r.RequestID == "r-ana" {
			wantSuppressed(t, &r, "the resend of r-ana", SuppressedBounced)
		}
	}
	h.requestOf(t, "acme", "r-cy", "cy@example.com", false)
	wantSuppressed(t, h.outcome(t, "acme", "r-cy"), "r-cy", SuppressedComplained)
	for _, who := range []string{"bo", "dee", "eve"} {
		h.requestOf(t, "acme", "r-"+who, who+"@example.com", false)
		if rej := h.outcome(t, "acme", "r-"+who); rej != nil {
			t.Fatalf("r-%s: %+v, want issued: its feedback lists nobody", who, rej)
		}
	}
	h.requestOf(t, "globex", "r-ana-globex", "ana@example.com", false)
	if rej := h.outcome(t, "globex", "r-ana-globex"); rej != nil {
		t.Fatalf("globex's ana: %+v, want issued: acme's list is acme's", rej)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.issued.acme")); n != 4 { // r-ana, bo, dee, eve
		t.Fatalf("%d codes issued in acme, want 4", n)
	}

	// A rotation: the entry, under the old key, still refuses her, and is copied under
	// the new one, so that it outlives the old key once the ring drops it.
	k1, k2 := h.subjectKey, keys.Generate("k2", 32)
	h.start(t, k2+","+k1)
	h.requestOf(t, "acme", "r-ana3", "ana@example.com", false)
	wantSuppressed(t, h.outcome(t, "acme", "r-ana3"), "r-ana3", SuppressedBounced)
	h.start(t, k2)
	h.requestOf(t, "acme", "r-ana3b", "ana@example.com", false)
	wantSuppressed(t, h.outcome(t, "acme", "r-ana3b"), "r-ana3b", SuppressedBounced)
	h.start(t, k2+","+k1) // the old key back, for the erasure below to find both

	// Her erasure takes her entry with the rest of her.
	_, err := h.svc.Erase(context.Background(), events.ErasureRequested{Tenant: "acme", RecipientHashes: h.subjects.SubjectHashes("acme", "ana@example.com")})
	testenv.Must(t, err, "erase")
	if n := h.suppressions(t); n != 1 {
		t.Fatalf("%d entries after ana's erasure (under both keys), want cy's alone", n)
	}
	h.requestOf(t, "acme", "r-ana4", "ana@example.com", false)
	if rej := h.outcome(t, "acme", "r-ana4"); rej != nil {
		t.Fatalf("r-ana4 after her erasure: %+v", rej)
	}
}

// TestFeedbackOfAnErasedPersonListsNobody: feedback that OTP_EVENTS stored before the
// person's erasure and that the issuer reads only after it (it was down) does not put
// them back on the list: the erasure wins.
func TestFeedbackOfAnErasedPersonListsNobody(t *testing.T) {
	h := newHarness(t)
	h.stop()
	h.feedback(t, "1", "acme", "fay@example.com", events.FeedbackComplained, "")
	_, err := h.svc.Erase(context.Background(), events.ErasureRequested{Tenant: "acme", RecipientHashes: h.subjects.SubjectHashes("acme", "fay@example.com")})
	testenv.Must(t, err, "erase")
	h.feedback(t, "2", "acme", "gus@example.com", events.FeedbackComplained, "")
	h.start(t, h.subjectKey)
	testenv.Eventually(t, 10*time.Second, "gus listed", func() bool { return h.suppressions(t) >= 1 })
	var who string
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT recipient_key FROM issuer.suppressions`).Scan(&who), "read")
	if h.suppressions(t) != 1 || who != h.subjects.Subject("acme", "gus@example.com") {
		t.Fatalf("%d entries (%s), want gus's alone", h.suppressions(t), who)
	}
}

// feedbackRead waits until the issuer has read every otp.feedback on the stream.
func (h *harness) feedbackRead(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, "the feedback read", func() bool {
		c, err := h.js.Consumer(context.Background(), events.StreamEvents, events.IssuerFeedbackConsumer.Durable)
		testenv.Must(t, err, "consumer")
		ci, err := c.Info(context.Background())
		testenv.Must(t, err, "consumer info")
		return ci.NumPending == 0 && ci.NumAckPending == 0
	})
}

// TestSuppressionPolicyAndOperators: a tenant whose policy turns suppression off lists
// nobody and refuses nobody; with an expiry, an entry refuses until it lapses, and a
// change of the expiry reaches the entries already made. An operator's entry refuses with
// limit operator; feedback does not replace one for ever, nor does an operator's shorter
// one; a lapsed operator's entry is purged; removal by recipient or in bulk by reason
// serves the recipients again, and a bounce from before a removal (a notification sent
// to the queue again) does not list the person again, while a later one does.
func TestSuppressionPolicyAndOperators(t *testing.T) {
	const initechFor1h = "tenants:\n  globex:\n    suppression:\n      disabled: true\n  initech:\n    suppression:\n      expiry: 1h\n"
	h := newPolicyHarness(t, initechFor1h)
	ctx := context.Background()
	h.feedback(t, "g", "globex", "hal@example.com", events.FeedbackBounced, "Permanent")
	// A bounce 58 minutes ago: its entry lapses in two.
	h.feedbackAt(t, "i", "initech", "ivy@example.com", events.FeedbackBounced, "Permanent", time.Now().UTC().Add(-58*time.Minute))
	h.feedbackRead(t)
	h.requestOf(t, "globex", "r-hal", "hal@example.com", false)
	if rej := h.outcome(t, "globex", "r-hal"); rej != nil {
		t.Fatalf("globex (suppression off): %+v", rej)
	}
	h.requestOf(t, "initech", "r-ivy", "ivy@example.com", false)
	wantSuppressed(t, h.outcome(t, "initech", "r-ivy"), "r-ivy", SuppressedBounced)
	h.advance(3 * time.Minute)
	h.requestOf(t, "initech", "r-ivy2", "ivy@example.com", false)
	if rej := h.outcome(t, "initech", "r-ivy2"); rej != nil {
		t.Fatalf("initech after the entry's expiry: %+v", rej)
	}
	// The tenant drops its expiry: the entry, still there, refuses again.
	var err error
	h.policies, err = policy.Parse([]byte("tenants:\n  initech: {}\n"))
	testenv.Must(t, err, "policy")
	h.start(t, h.subjectKey)
	h.requestOf(t, "initech", "r-ivy3", "ivy@example.com", true)
	h.requestOf(t, "initech", "r-ivy4", "ivy@example.com", false)
	wantSuppressed(t, h.outcome(t, "initech", "r-ivy4"), "r-ivy4", SuppressedBounced)

	jon := h.subjects.Subject("acme", "jon@example.com")
	if added, err := Suppress(ctx, h.pool, "acme", jon, "operator_action:test", 0); err != nil || !added {
		t.Fatalf("suppress: %v %v", added, err)
	}
	h.feedback(t, "j", "acme", "jon@example.com", events.FeedbackBounced, "Permanent")
	h.feedbackRead(t)
	if added, err := Suppress(ctx, h.pool, "acme", jon, "operator_action:shorter", time.Hour); err != nil || added {
		t.Fatalf("a shorter operator entry over one for ever: added %v, %v", added, err)
	}
	h.requestOf(t, "acme", "r-jon", "jon@example.com", false)
	wantSuppressed(t, h.outcome(t, "acme", "r-jon"), "r-jon", SuppressedOperator)
	list, err := ListSuppressions(ctx, h.pool, "acme", nil, 0)
	testenv.Must(t, err, "list")
	if len(list) != 1 || list[0].Reason != SuppressedOperator || list[0].RecipientHash != jon || list[0].ExpiresAt != nil || list[0].Source != "operator_action:test" {
		t.Fatalf("list %+v, want jon's operator entry for ever, untouched", list)
	}
	if _, err := Unsuppress(ctx, h.pool, "acme", Unlist{Hashes: h.subjects.SubjectHashes("acme", "jon@example.com")}); err != nil {
		t.Fatal(err)
	}
	if _, err := Unsuppress(ctx, h.pool, "acme", Unlist{Hashes: h.subjects.SubjectHashes("acme", "jon@example.com")}); err != ErrNotSuppressed {
		t.Fatalf("a second remove: %v, want ErrNotSuppressed", err)
	}
	if _, err := Unsuppress(ctx, h.pool, "acme", Unlist{}); err == nil {
		t.Fatal("a remove naming nothing removed the whole list")
	}
	// The attack of whoever can send to the feedback queue: a genuine notification of
	// jon's old bounce, sent again after the operator took him off. It happened before
	// the removal, so it lists him no more.
	h.feedbackAt(t, "j-replayed", "acme", "jon@example.com", events.FeedbackBounced, "Permanent", time.Now().UTC().Add(-time.Minute))
	h.feedbackRead(t)
	if list, err := ListSuppressions(ctx, h.pool, "acme", h.subjects.SubjectHashes("acme", "jon@example.com"), 0); err != nil || len(list) != 0 {
		t.Fatalf("jon after a replayed bounce: %+v, %v; want him off the list", list, err)
	}
	// A refusal stamps no cooldown: served at once.
	h.requestOf(t, "acme", "r-jon2", "jon@example.com", false)
	if rej := h.outcome(t, "acme", "r-jon2"); rej != nil {
		t.Fatalf("jon once removed: %+v", rej)
	}

	// An operator's entry that lapsed is purged; feedback entries are not.
	_, err = Suppress(ctx, h.pool, "acme", h.subjects.Subject("acme", "kay@example.com"), "operator_action:brief", time.Microsecond)
	testenv.Must(t, err, "suppress kay")
	before := h.suppressions(t)
	if n, err := h.svc.Purge(ctx); err != nil || n == 0 || h.suppressions(t) != before-1 {
		t.Fatalf("purge: %d rows, %v; %d entries left of %d, want kay's gone", n, err, h.suppressions(t), before)
	}

	// After a false alarm (every mail bounced for a while), the bounces go in bulk.
	h.feedback(t, "l", "acme", "lou@example.com", events.FeedbackBounced, "Permanent")
	h.feedback(t, "m", "acme", "max@example.com", events.FeedbackComplained, "")
	h.feedbackRead(t)
	removed, err := Unsuppress(ctx, h.pool, "acme", Unlist{Reason: SuppressedBounced, Since: time.Now().Add(-time.Minute)})
	testenv.Must(t, err, "bulk remove")
	if len(removed) != 1 || removed[0].RecipientHash != h.subjects.Subject("acme", "lou@example.com") {
		t.Fatalf("bulk remove %+v, want lou's bounce alone", removed)
	}

	// A bounce that happens after the removal lists him again.
	h.feedbackAt(t, "j-later", "acme", "jon@example.com", events.FeedbackBounced, "Permanent", time.Now().UTC().Add(time.Second))
	h.feedbackRead(t)
	if list, err := ListSuppressions(ctx, h.pool, "acme", h.subjects.SubjectHashes("acme", "jon@example.com"), 0); err != nil ||
		len(list) != 1 || list[0].Reason != SuppressedBounced {
		t.Fatalf("jon after a new bounce: %+v, %v; want him listed as bounced", list, err)
	}
}

// TestMalformedFeedbackIsDeadLettered: feedback the issuer cannot read, or whose tenant is
// not its subject's, goes to OTP_DLQ with the reason; the consumer goes on with the next.
func TestMalformedFeedbackIsDeadLettered(t *testing.T) {
	h := newHarness(t)
	_, err := h.js.Publish(context.Background(), "otp.feedback.acme", []byte(`{"kind":`))
	testenv.Must(t, err, "publish")
	h.feedback(t, "x", "globex", "kim@example.com", events.FeedbackComplained, "")
	// globex's feedback republished under acme's subject.
	m := testenv.Messages(t, h.js, events.StreamEvents, "otp.feedback.globex")[0]
	_, err = h.js.Publish(context.Background(), "otp.feedback.acme", m.Data)
	testenv.Must(t, err, "publish")
	h.feedback(t, "y", "acme", "lea@example.com", events.FeedbackComplained, "")
	dead := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq.acme", 2, 10*time.Second)
	reasons := dead[0].Header.Get(events.HeaderDLQReason) + " | " + dead[1].Header.Get(events.HeaderDLQReason)
	if !strings.Contains(reasons, "issuer: feedback") || !strings.Contains(reasons, "not its subject's") {
		t.Fatalf("dead letter reasons %q", reasons)
	}
	testenv.Eventually(t, 10*time.Second, "kim and lea listed", func() bool { return h.suppressions(t) == 2 })
}

// TestFeedbackWaitsForAnErasureInProgress: feedback stored before a person's erasure, read
// while the erasure's transaction is open (it has recorded the erasure and deleted their
// entries, and not committed), waits for it on the person's erasure lock and then lists
// nobody. Without the lock it would insert beside the uncommitted erasure and survive it.
func TestFeedbackWaitsForAnErasureInProgress(t *testing.T) {
	h := newHarness(t)
	h.stop()
	h.feedback(t, "1", "acme", "ned@example.com", events.FeedbackComplained, "")
	ctx := context.Background()
	tx, err := h.pool.Begin(ctx)
	testenv.Must(t, err, "begin")
	defer tx.Rollback(ctx)
	testenv.Must(t, platform.RecordErasure(ctx, tx, Schema, events.ErasureRequested{ErasureID: uuid.NewString(), Tenant: "acme",
		RecipientHashes: h.subjects.SubjectHashes("acme", "ned@example.com")}), "record the erasure")
	_, err = tx.Exec(ctx, `DELETE FROM issuer.suppressions WHERE tenant = 'acme'`)
	testenv.Must(t, err, "erase the entries")

	h.start(t, h.subjectKey)
	testenv.Eventually(t, 10*time.Second, "the feedback waiting on the erasure lock", func() bool {
		var n int
		testenv.Must(t, h.pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted`).Scan(&n), "locks")
		return n > 0
	})
	testenv.Must(t, tx.Commit(ctx), "commit the erasure")
	h.feedbackRead(t)
	if n := h.suppressions(t); n != 0 {
		t.Fatalf("%d entries: the feedback listed a person erased while it waited", n)
	}
}
