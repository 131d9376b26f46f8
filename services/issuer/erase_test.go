package issuer

import (
	"context"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestErasureWinsOverARequestInFlight: a person's request that OTP_REQUESTS stored before
// they were erased (the issuer was behind) is refused when it is decided afterwards, with
// reason erased: no challenge, no code, no job. A request of theirs stored after the
// erasure is served once their cooldown (kept on purpose) has passed. The erasure also took their earlier challenge and its otp.challenge
// still in the outbox.
func TestErasureWinsOverARequestInFlight(t *testing.T) {
	h := newHarness(t)
	h.request(t, `{"request_id":"r-0","recipient":"ana@example.com","purpose":"login","context":{"session_id":"sess-0"}}`)
	testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", 1, 10*time.Second)
	// An otp.challenge of hers not yet relayed (as after a crash between commit and publish).
	_, err := h.pool.Exec(context.Background(), `INSERT INTO issuer.outbox (subject, header, data)
		SELECT 'otp.challenge.acme', jsonb_build_object('Nats-Msg-Id', jsonb_build_array('challenge:' || challenge_id || ':1')), '\x7b7d'
		FROM issuer.challenges WHERE request_id = 'r-0'`)
	testenv.Must(t, err, "outbox row")
	h.stop()
	h.request(t, `{"request_id":"r-1","recipient":"Ana@Example.com","purpose":"login"}`)

	n, err := h.svc.Erase(context.Background(), events.ErasureRequested{Tenant: "acme",
		RecipientHashes: h.subjects.SubjectHashes("acme", "ana@example.com")})
	testenv.Must(t, err, "erase")
	if n != 3 { // r-0's challenge, its code, its otp.challenge in the outbox
		t.Fatalf("erased %d rows, want 3", n)
	}
	h.start(t, h.subjectKey)
	rej := decode[events.Rejected](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.rejected.acme", 1, 10*time.Second)[0])
	if rej.RequestID != "r-1" || rej.Reason != events.ReasonErased {
		t.Fatalf("rejected %+v, want r-1 refused as erased", rej)
	}
	var challenges, outbox int
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM issuer.challenges), (SELECT count(*) FROM issuer.outbox)`).
		Scan(&challenges, &outbox), "count")
	if challenges != 0 || outbox != 0 {
		t.Fatalf("%d challenges and %d outbox rows after the erasure, want none", challenges, outbox)
	}

	// The rate-limit state is kept on purpose: a request stored after the erasure right
	// away is still within the person's cooldown. Once it has passed, a request of theirs
	// is a new one and is served.
	h.request(t, `{"request_id":"r-2","recipient":"ana@example.com","purpose":"login"}`)
	testenv.Eventually(t, 10*time.Second, "r-2 refused by the cooldown", func() bool {
		for _, m := range testenv.Messages(t, h.js, events.StreamEvents, "otp.rejected.acme") {
			if r := decode[events.Rejected](t, m); r.RequestID == "r-2" {
				return r.Reason == events.ReasonRateLimited && r.Limit == "recipient_cooldown"
			}
		}
		return false
	})
	h.advance(2 * time.Minute)
	h.request(t, `{"request_id":"r-3","recipient":"ana@example.com","purpose":"login"}`)
	testenv.Eventually(t, 10*time.Second, "r-3 issued", func() bool {
		for _, m := range testenv.Messages(t, h.js, events.StreamEvents, "otp.issued.acme") {
			if decode[events.Issued](t, m).RequestID == "r-3" {
				return true
			}
		}
		return false
	})
}
