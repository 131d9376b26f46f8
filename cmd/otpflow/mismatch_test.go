package main

import (
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestResendToAnotherAddressSendsNothing performs the attack the security review
// confirmed through the running pipeline: after a first code for the victim under
// request id h-1, the same request id with the attacker's address and "resend": true
// (cooldowns off, so nothing else refuses it) must mail nothing to the attacker, be
// refused as challenge_mismatch, and leave the victim's challenge verifiable.
func TestResendToAnotherAddressSendsNothing(t *testing.T) {
	w := newWorld(t)
	w.env["OTP_TENANTS_FILE"] = tenantsFile(t, `
tenants:
  acme:
    resend_cooldown: 0s
    rate_limits: {recipient_cooldown: 0s}
`)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())

	a.request(t, "acme", `{"request_id":"h-1","recipient":"victim@example.com","purpose":"login"}`)
	code := codeOf(t, w.smtp.WaitFor(t, 1, 30*time.Second)[0])

	a.request(t, "acme", `{"request_id":"h-1","recipient":"attacker@example.com","purpose":"login","resend":true}`)
	a.request(t, "acme", `{"request_id":"h-1","recipient":"attacker@example.com","purpose":"login"}`)
	testenv.Eventually(t, 20*time.Second, "both attacks refused", func() bool { return count(t, a.js, "otp.rejected.acme") == 2 })
	for _, r := range eventsOf[events.Rejected](t, a.js, "otp.rejected.acme") {
		if r.Reason != events.ReasonChallengeMismatch {
			t.Fatalf("rejection %+v, want challenge_mismatch", r)
		}
	}
	// A later request for someone else is mailed: the pipeline is past the attacks.
	a.request(t, "acme", `{"request_id":"later","recipient":"bo@example.com","purpose":"login"}`)
	w.smtp.WaitFor(t, 2, 30*time.Second)
	if got := mailsTo(w.smtp.Mails(), "attacker@example.com"); len(got) != 0 {
		t.Fatalf("%d mails reached the attacker", len(got))
	}
	if n := count(t, a.js, "otp.issued.acme"); n != 2 {
		t.Fatalf("%d codes issued, want the victim's and bo's", n)
	}
	if r := a.verify(t, "acme", "h-1", code); r.Status != events.StatusVerified {
		t.Fatalf("the victim's code after the attack: %+v, want verified", r)
	}
}
