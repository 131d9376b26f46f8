package verifier

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestErasureWinsOverACodeInFlight: a code the verifier has already pulled when the
// person is erased (the erase command deleted it from OTP_CHALLENGES, but not from the
// batch in hand) is dropped, not projected after the erasure answered: no row holds the
// person's hashes or session, and the code answers not_found. A code of theirs issued
// after the erasure is a new one and verifies.
func TestErasureWinsOverACodeInFlight(t *testing.T) {
	fetched, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	h := newPolicyHarness(t, "", func() { once.Do(func() { close(fetched); <-release }) })
	exp := time.Now().Add(5 * time.Minute)
	h.publishIssued(t, issue{ChallengeID: ch(900), RequestID: "race-1", CodeSeq: 1, Recipient: "ana@example.com",
		SessionID: "sess-ana-race", ExpiresAt: exp}, "123456")
	<-fetched // the verifier holds the batch with the code

	n, err := h.svc.Erase(context.Background(), events.ErasureRequested{Tenant: "acme",
		RecipientHashes: h.subjects.SubjectHashes("acme", "ana@example.com")})
	testenv.Must(t, err, "erase")
	if n != 0 {
		t.Fatalf("erased %d rows before anything was projected", n)
	}
	close(release)
	testenv.Eventually(t, 10*time.Second, "the batch settled", func() bool {
		c, err := h.js.Consumer(t.Context(), events.StreamChallenges, events.ConsumerVerifier)
		if err != nil {
			return false
		}
		info, err := c.Info(t.Context())
		return err == nil && info.NumPending == 0 && info.NumAckPending == 0
	})
	dump, counts := testenv.DumpSchema(t, h.pool, Schema)
	if counts["challenges"] != 0 || counts["codes"] != 0 {
		t.Fatalf("the erased person's code was projected after the erasure:\n%s", dump)
	}
	testenv.AssertNoPlaintext(t, dump, "sess-ana-race")
	if r := h.verify(t, "race-1", "123456", "sess-ana-race"); r.Status != events.StatusNotFound {
		t.Fatalf("the erased person's code: %+v, want not_found", r)
	}
	if dl := testenv.Messages(t, h.js, events.StreamDLQ, ""); len(dl) != 0 {
		t.Fatalf("the dropped code was dead-lettered: %d entries", len(dl))
	}

	// A code issued after the erasure is the person's new one.
	h.publishIssued(t, issue{ChallengeID: ch(901), RequestID: "after-1", CodeSeq: 1, Recipient: "ana@example.com",
		SessionID: "sess-new", ExpiresAt: exp}, "654321")
	h.waitProjected(t, ch(901), 1)
	if r := h.verify(t, "after-1", "654321", "sess-new"); r.Status != events.StatusVerified {
		t.Fatalf("a code issued after the erasure: %+v", r)
	}
}

// TestDeadLetteredCodeNamesItsPerson: an otp.challenge the verifier dead-letters carries
// the person's subject hash in Otp-Recipient-Hash, so an erasure finds it in OTP_DLQ.
func TestDeadLetteredCodeNamesItsPerson(t *testing.T) {
	h := newHarness(t)
	h.publishIssued(t, issue{ChallengeID: ch(902), RequestID: "dl-1", CodeSeq: 1, Recipient: "ana@example.com",
		SessionID: "bad\nsession", ExpiresAt: time.Now().Add(5 * time.Minute)}, "123456")
	dl := testenv.WaitMessages(t, h.js, events.StreamDLQ, "", 1, 10*time.Second)
	if got := dl[0].Header.Get(events.HeaderRecipientHash); !h.subjects.MatchesSubject(got, "acme", "ana@example.com") {
		t.Fatalf("dead letter of ana's code names %q", got)
	}
}
