package issuer

import (
	"context"
	"fmt"
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
	h.request(t, `{"request_id":"h-1","recipient":"kim@example.com","purpose":"login"}`)
	first := h.issued(t, 1)[0]
	h.advance(31 * time.Second) // past the resend cooldown: only the binding can refuse

	attacks := []string{
		`{"request_id":"h-1","recipient":"attacker@example.com","purpose":"login","resend":true}`,
		`{"request_id":"h-1","recipient":"attacker@example.com","purpose":"login"}`,
		`{"request_id":"h-1","recipient":"kim@example.com","purpose":"reset_password","resend":true}`,
		`{"request_id":"h-1","recipient":"kim@example.co","purpose":"login","resend":true}`,
		// Unicode case folding would make KELVIN SIGN K a "k": another mailbox that a
		// lowercasing comparison calls the same.
		`{"request_id":"h-1","recipient":"\u212Aim@example.com","purpose":"login","resend":true}`,
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
	// The same address in another ASCII case is the same person: a resend goes through,
	// and goes to the challenge's own address as first written, never to the spelling of
	// the resend (local parts may be case-sensitive on the receiving host).
	h.request(t, `{"request_id":"h-1","recipient":"KIM@EXAMPLE.com","purpose":"login","resend":true}`)
	issued := h.issued(t, 2)
	if issued[1].ChallengeID != first.ChallengeID || issued[1].CodeSeq != 2 || issued[1].RecipientMasked != "k***@example.com" {
		t.Fatalf("resend = %+v", issued[1])
	}
	jobs := testenv.WaitMessages(t, h.js, events.StreamDispatch, "", 2, 10*time.Second)
	for _, m := range jobs {
		if job := h.openJob(t, m); job.ChallengeID != first.ChallengeID || job.Recipient != "kim@example.com" {
			t.Fatalf("a job went to %q", job.Recipient)
		}
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.issued.acme")); n != 2 {
		t.Fatalf("%d codes issued, want the first and the victim's own resend", n)
	}
	var count int
	var sealKeyID string
	var sealed []byte
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT code_count, recipient_seal_key_id, recipient_sealed FROM issuer.challenges
		WHERE request_id = 'h-1'`).Scan(&count, &sealKeyID, &sealed), "challenge")
	rcpt, err := h.sealer.Open(sealKeyID, recipientAD(first.ChallengeID), sealed)
	testenv.Must(t, err, "open the challenge's recipient")
	if count != 2 || string(rcpt) != "kim@example.com" {
		t.Fatalf("challenge now has %d codes for %q", count, rcpt)
	}
}

// TestIssuerDecidesOnTheDatabaseClock: issue and expiry times are the database's, not
// the process's (with no test skew, a process clock that were used would show here as
// soon as it drifts; the bounds are the database clock read around the request).
func TestIssuerDecidesOnTheDatabaseClock(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	var before, after time.Time
	testenv.Must(t, h.pool.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&before), "clock")
	h.request(t, `{"request_id":"clock","recipient":"ana@example.com","purpose":"login","ttl_seconds":120}`)
	is := h.issued(t, 1)[0]
	testenv.Must(t, h.pool.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&after), "clock")
	if is.IssuedAt.Before(before) || is.IssuedAt.After(after) || is.ExpiresAt.Sub(is.IssuedAt) != 2*time.Minute {
		t.Fatalf("issued %v, expires %v; the database clock read %v and %v around it", is.IssuedAt, is.ExpiresAt, before, after)
	}
	var stored time.Time
	testenv.Must(t, h.pool.QueryRow(ctx, `SELECT expires_at FROM issuer.challenges WHERE request_id = 'clock'`).Scan(&stored), "row")
	if !stored.Equal(is.ExpiresAt) {
		t.Fatalf("stored expiry %v, event %v", stored, is.ExpiresAt)
	}
}

// TestIPLimitsCountEverySpellingOfOneClient: an attacker may write one IP many ways, or
// rotate through the addresses of their IPv6 /64; the per-IP limit counts one client.
func TestIPLimitsCountEverySpellingOfOneClient(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {ip_per_minute: 2}
`)
	for i, ip := range []string{"2001:db8::1", "2001:DB8:0:0:0:0:0:2", "2001:db8::ffff:3", "::ffff:192.0.2.1", "192.0.2.1", "192.0.2.1"} {
		h.request(t, fmt.Sprintf(`{"request_id":"ip-%d","recipient":"u%d@example.com","purpose":"login","context":{"ip":%q}}`, i, i, ip))
	}
	rejected := h.rejections(t, 2)
	if n := len(h.issued(t, 4)); n != 4 {
		t.Fatalf("%d issued, want 4", n)
	}
	for i, r := range rejected {
		if want := []string{"ip-2", "ip-5"}[i]; r.Limit != "ip_per_minute" || r.RequestID != want {
			t.Fatalf("rejection %+v, want ip_per_minute for %s", r, want)
		}
	}
}
