package issuer

import (
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNoCodeIsMailedBeforeTheVerifierCanCloseTheOldOne: a second request for a recipient
// supersedes the first challenge. While OTP_CHALLENGES cannot store the supersession
// and the new otp.challenge, the job that would mail the new code is not published
// either: a user must never hold the new code while the verifier can still know nothing
// of the old one's end (or of the new one). Once the stream is back, the relay publishes
// them, the verifier's stream first.
func TestNoCodeIsMailedBeforeTheVerifierCanCloseTheOldOne(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_cooldown: 0s}
`)
	ctx := t.Context()
	h.request(t, `{"request_id":"s1","recipient":"ana@example.com","purpose":"login"}`)
	testenv.WaitMessages(t, h.js, events.StreamDispatch, "", 1, 10*time.Second)

	testenv.Must(t, h.js.DeleteStream(ctx, events.StreamChallenges), "delete %s", events.StreamChallenges)
	ack, err := h.js.Publish(ctx, "otp.requested.acme", []byte(`{"request_id":"s2","recipient":"ana@example.com","purpose":"login"}`))
	testenv.Must(t, err, "request s2")
	// The issuer acknowledges a request once it has committed it and tried to publish
	// what it decided.
	testenv.WaitDrained(t, h.js, events.StreamRequests, events.IssuerConsumers(nil)[0].Durable, ack.Sequence, 10*time.Second)
	if jobs := testenv.Messages(t, h.js, events.StreamDispatch, ""); len(jobs) != 1 {
		t.Fatalf("%d dispatch jobs while the verifier's stream could not store s2's challenge and supersession; want s1's only", len(jobs))
	}
	var left int
	testenv.Must(t, h.pool.QueryRow(ctx, `SELECT count(*) FROM issuer.outbox`).Scan(&left), "outbox")
	if left == 0 {
		t.Fatal("s2's events are neither published nor left for the relay")
	}

	_, err = platform.Provision(ctx, h.js, events.StreamOptions{})
	testenv.Must(t, err, "provision again")
	job := testenv.WaitMessages(t, h.js, events.StreamDispatch, "", 2, 30*time.Second)[1]
	for _, typ := range events.ChallengeTypes {
		m := testenv.WaitMessages(t, h.js, events.StreamChallenges, typ.Subject("acme"), 1, 10*time.Second)[0]
		if job.Time.Before(m.Time) {
			t.Errorf("s2's job was stored at %v, before its %s (%v)", job.Time, typ, m.Time)
		}
	}
}
