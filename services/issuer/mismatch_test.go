package issuer

import (
	"context"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestRepeatedRequestIDCannotRedirectTheChallenge performs the attack of the security
// review: after a code for the victim under request id h-1, the same request id with
// another address (with and without resend) or another purpose must not issue a code,
// must not touch the challenge, and is refused as challenge_mismatch.
func TestRepeatedRequestIDCannotRedirectTheChallenge(t *testing.T) {
	h := newHarness(t)
	h.request(t, `{"request_id":"h-1","recipient":"victim@example.com","purpose":"login"}`)
	first := h.issued(t, 1)[0]
	h.advance(31 * time.Second) // past the resend cooldown: only the binding can refuse

	attacks := []string{
		`{"request_id":"h-1","recipient":"attacker@example.com","purpose":"login","resend":true}`,
		`{"request_id":"h-1","recipient":"attacker@example.com","purpose":"login"}`,
		`{"request_id":"h-1","recipient":"victim@example.com","purpose":"reset_password","resend":true}`,
		`{"request_id":"h-1","recipient":"victim@example.co","purpose":"login","resend":true}`,
	}
	for _, body := range attacks {
		h.request(t, body)
	}
	rejected := h.rejections(t, len(attacks))
	for _, r := range rejected {
		if r.Reason != events.ReasonChallengeMismatch || r.RequestID != "h-1" {
			t.Fatalf("rejection %+v, want challenge_mismatch for h-1", r)
		}
	}
	// The same address in another case is the same person: a resend goes through, to
	// the challenge's own address.
	h.request(t, `{"request_id":"h-1","recipient":"Victim@EXAMPLE.com","purpose":"login","resend":true}`)
	issued := h.issued(t, 2)
	if issued[1].ChallengeID != first.ChallengeID || issued[1].CodeSeq != 2 {
		t.Fatalf("resend = %+v", issued[1])
	}
	jobs := testenv.WaitMessages(t, h.js, events.StreamDispatch, "", 2, 10*time.Second)
	for _, m := range jobs {
		if job := h.openJob(t, m); job.ChallengeID != first.ChallengeID || events.CanonicalAddress(job.Recipient) != "victim@example.com" {
			t.Fatalf("a job went to %q", job.Recipient)
		}
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.issued.acme")); n != 2 {
		t.Fatalf("%d codes issued, want the first and the victim's own resend", n)
	}
	var count int
	var rcpt string
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT code_count, recipient FROM issuer.challenges WHERE request_id = 'h-1'`).Scan(&count, &rcpt), "challenge")
	if count != 2 || rcpt != "victim@example.com" {
		t.Fatalf("challenge now has %d codes for %q", count, rcpt)
	}
}
