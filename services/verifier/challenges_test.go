//lint:file-ignore SA1019 the otp.issued of earlier releases is written as it was

package verifier

import (
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// supersede publishes the supersession of challenge (request requestID) on OTP_CHALLENGES,
// as the issuer does.
func (h *harness) supersede(t *testing.T, challenge, requestID, by string) {
	t.Helper()
	publishEvent(t, h.js, events.TypeChallengeSuperseded, "acme", "challenge_superseded:"+challenge, challenge, events.Superseded{
		ChallengeID: challenge, Tenant: "acme", RequestID: requestID, SupersededBy: by, SupersededAt: time.Now().UTC()})
}

// TestProjectionFromChallengesAlone: the verifier learns of codes and of their
// supersession from OTP_CHALLENGES alone, whatever order they arrive in. Nothing is
// published to OTP_EVENTS but what the verifier itself decides.
func TestProjectionFromChallengesAlone(t *testing.T) {
	h := newHarness(t)
	exp := time.Now().Add(5 * time.Minute)

	// In order: a challenge, then a newer one that supersedes it.
	h.issue(t, ch(200), "first", 1, "111111", "", exp)
	h.issue(t, ch(201), "second", 1, "222222", "", exp)
	h.supersede(t, ch(200), "first", "second")
	testenv.Eventually(t, 10*time.Second, "the supersession projected", func() bool {
		var status string
		_ = h.pool.QueryRow(t.Context(), `SELECT status FROM verifier.challenges WHERE challenge_id = $1`, ch(200)).Scan(&status)
		return status == statusSuperseded
	})
	if r := h.verify(t, "first", "111111", ""); r.Status != events.StatusSuperseded {
		t.Fatalf("the superseded code: %+v, want superseded", r)
	}
	if r := h.verify(t, "second", "222222", ""); r.Status != events.StatusVerified {
		t.Fatalf("the newer code: %+v, want verified", r)
	}

	// Out of order (an outbox relay may publish a supersession before the code it
	// closes): the supersession first, then the code. The code never verifies.
	h.supersede(t, ch(202), "third", "fourth")
	testenv.Eventually(t, 10*time.Second, "the early supersession projected", func() bool {
		var status string
		_ = h.pool.QueryRow(t.Context(), `SELECT status FROM verifier.challenges WHERE challenge_id = $1`, ch(202)).Scan(&status)
		return status == statusSuperseded
	})
	// A purge in between keeps what the supersession wrote until its codes come.
	_, err := h.svc.Purge(t.Context())
	testenv.Must(t, err, "purge")
	h.issue(t, ch(202), "third", 1, "333333", "", exp)
	if r := h.verify(t, "third", "333333", ""); r.Status != events.StatusSuperseded {
		t.Fatalf("a code whose supersession came first: %+v, want superseded", r)
	}

	// A supersession that names another request's challenge closes nothing.
	h.issue(t, ch(203), "fifth", 1, "555555", "", exp)
	h.supersede(t, ch(203), "not-fifth", "x")
	h.supersede(t, ch(204), "fifth", "x")
	cons, err := h.js.Consumer(t.Context(), events.StreamChallenges, events.ConsumerVerifier)
	testenv.Must(t, err, "consumer")
	testenv.Eventually(t, 10*time.Second, "every challenge event settled", func() bool {
		info, err := cons.Info(t.Context())
		return err == nil && info.NumAckPending == 0 && info.NumPending == 0
	})
	if r := h.verify(t, "fifth", "555555", ""); r.Status != events.StatusVerified {
		t.Fatalf("a challenge another request's supersession named: %+v, want verified", r)
	}

	// Nothing came from OTP_EVENTS: only the verifier's own decisions are there.
	for _, m := range testenv.Messages(t, h.js, events.StreamEvents, "") {
		if typ, _, _ := events.SplitSubject(m.Subject); typ == events.TypeIssued || typ == events.TypeSuperseded {
			t.Fatalf("the test published %s to OTP_EVENTS", m.Subject)
		}
	}
}

// TestIssuedOfEarlierReleasesStillVerifies: a code issued before the upgrade is announced
// only by an otp.issued on OTP_EVENTS that carries its HMAC; the verifier's consumer of
// earlier releases still projects it, and its supersession, for one release. An
// otp.issued of this release carries no HMAC and is passed over, not dead-lettered.
func TestIssuedOfEarlierReleasesStillVerifies(t *testing.T) {
	h := newHarness(t)
	exp := time.Now().Add(5 * time.Minute).UTC()
	mac := func(challenge, code string) []byte {
		m, err := h.pepper.MAC("p1", challenge, code)
		testenv.Must(t, err, "mac")
		return m
	}
	old := func(challenge, requestID, code string) events.Issued {
		return events.Issued{ChallengeID: challenge, Tenant: "acme", RequestID: requestID, CodeSeq: 1, Recipient: "ana@example.com",
			Purpose: "login", CodeLength: 6, CodeHMAC: mac(challenge, code), PepperKeyID: "p1", MaxAttempts: 5,
			SessionID: "s-1", IssuedAt: time.Now().UTC(), ExpiresAt: exp}
	}
	publishEvent(t, h.js, events.TypeIssued, "acme", "issued:old-1", ch(210), old(ch(210), "old-1", "111111"))
	publishEvent(t, h.js, events.TypeIssued, "acme", "issued:old-2", ch(211), old(ch(211), "old-2", "222222"))
	publishEvent(t, h.js, events.TypeSuperseded, "acme", "superseded:old-2", ch(211), events.Superseded{
		ChallengeID: ch(211), Tenant: "acme", RequestID: "old-2", SupersededBy: "x", SupersededAt: time.Now().UTC()})
	// This release's otp.issued for a challenge: the audit's record, nothing to project.
	publishEvent(t, h.js, events.TypeIssued, "acme", "issued:new", ch(212), events.Issued{ChallengeID: ch(212), Tenant: "acme",
		RequestID: "new", CodeSeq: 1, RecipientHash: h.subjects.Subject("acme", "ana@example.com"), RecipientMasked: "a***@example.com",
		Purpose: "login", CodeLength: 6, MaxAttempts: 5, IssuedAt: time.Now().UTC(), ExpiresAt: exp})
	h.waitProjected(t, ch(210), 1)
	cons, err := h.js.Consumer(t.Context(), events.StreamEvents, events.ConsumerVerifier)
	testenv.Must(t, err, "the verifier's consumer of earlier releases")
	testenv.Eventually(t, 10*time.Second, "every OTP_EVENTS message settled", func() bool {
		info, err := cons.Info(t.Context())
		return err == nil && info.NumAckPending == 0 && info.NumPending == 0
	})
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 0 {
		t.Fatalf("%d dead letters", n)
	}
	if r := h.verify(t, "old-1", "111111", "s-1"); r.Status != events.StatusVerified {
		t.Fatalf("a code issued before the upgrade: %+v, want verified", r)
	}
	if r := h.verify(t, "old-2", "222222", "s-1"); r.Status != events.StatusSuperseded {
		t.Fatalf("a code superseded before the upgrade: %+v, want superseded", r)
	}
	if r := h.verify(t, "new", "333333", ""); r.Status != events.StatusNotFound {
		t.Fatalf("an otp.issued without a code: %+v, want not_found", r)
	}
	// The old event's recipient is kept only as its subject hashes.
	var keysOf []string
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT recipient_keys FROM verifier.challenges WHERE challenge_id = $1`, ch(210)).Scan(&keysOf), "keys")
	if len(keysOf) != 1 || keysOf[0] != h.subjects.Subject("acme", "ana@example.com") {
		t.Fatalf("recipient keys %q", keysOf)
	}
}

// TestSupersededCodeNeverVerifiesWhileTheProjectionLags: a user asks for a code, then
// for another; the issuer supersedes the first. Someone who holds the first code (read
// over the user's shoulder, or from a mailbox the user has since left) verifies it
// before the verifier has projected the supersession. The verify answers superseded at
// once, from the stream, and writes nothing, as does a guess; other challenges are
// answered as ever. When the stream cannot be read, a verify that would succeed fails
// (an error the app retries) and writes nothing, while a wrong guess is still answered.
func TestSupersededCodeNeverVerifiesWhileTheProjectionLags(t *testing.T) {
	var stalled, holding atomic.Bool
	release := make(chan struct{})
	h := newPolicyHarness(t, "", func() {
		if stalled.Load() {
			holding.Store(true)
			<-release
		}
	})
	t.Cleanup(func() {
		if stalled.Load() {
			close(release) // before the verifier stops
		}
	})
	exp := time.Now().Add(5 * time.Minute)
	h.issue(t, ch(300), "old", 1, "111111", "", exp)
	h.publishIssued(t, issue{ChallengeID: ch(303), RequestID: "old-cy", CodeSeq: 1, Recipient: "cy@example.com", ExpiresAt: exp}, "444444")
	h.waitProjected(t, ch(303), 1)
	h.publishIssued(t, issue{ChallengeID: ch(302), RequestID: "other", CodeSeq: 1, Recipient: "bo@example.com", ExpiresAt: exp}, "333333")
	h.waitProjected(t, ch(302), 1)

	// The issuer's next request for ana: the newer code and the supersession of the old
	// one, which the projection does not reach.
	stalled.Store(true)
	h.publishIssued(t, issue{ChallengeID: ch(301), RequestID: "new", CodeSeq: 1, Recipient: "ana@example.com", ExpiresAt: exp}, "222222")
	h.supersede(t, ch(300), "old", "new")
	// And cy's, superseded by a request of cy's the test leaves out.
	h.supersede(t, ch(303), "old-cy", "new-cy")
	testenv.Eventually(t, 10*time.Second, "the projection to stall", holding.Load)

	verify := func(requestID, code string) (events.VerifyReply, string) {
		t.Helper()
		body, _ := json.Marshal(events.VerifyRequest{RequestID: requestID, Code: code})
		msg, err := h.nc.Request("otp.verify.acme", body, 10*time.Second)
		testenv.Must(t, err, "verify %s", requestID)
		if e := msg.Header.Get(micro.ErrorCodeHeader); e != "" {
			return events.VerifyReply{}, e
		}
		var r events.VerifyReply
		testenv.Must(t, json.Unmarshal(msg.Data, &r), "reply %q", msg.Data)
		return r, ""
	}
	row := func(challenge string) (status string, attempts int) {
		t.Helper()
		testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT status, attempts FROM verifier.challenges WHERE challenge_id = $1`, challenge).Scan(&status, &attempts), "challenge %s", challenge)
		return status, attempts
	}

	if r, e := verify("old", "111111"); e != "" || r.Status != events.StatusSuperseded {
		t.Fatalf("the superseded code while its supersession is not projected: %+v, error %q; want superseded", r, e)
	}
	if r, e := verify("old", "999999"); e != "" || r.Status != events.StatusSuperseded {
		t.Fatalf("a wrong guess while the supersession is not projected: %+v, error %q; want superseded", r, e)
	}
	if r, e := verify("old-cy", "444444"); e != "" || r.Status != events.StatusSuperseded {
		t.Fatalf("cy's superseded code, the tenant's last supersession: %+v, error %q; want superseded", r, e)
	}
	if r, e := verify("old", "111111"); e != "" || r.Status != events.StatusSuperseded {
		t.Fatalf("ana's superseded code once the index has read cy's: %+v, error %q; want superseded", r, e)
	}
	if status, attempts := row(ch(300)); status != statusActive || attempts != 0 {
		t.Fatalf("the old challenge after the verifies: status %s, %d attempts; want still active (the projection stalls), no attempt counted", status, attempts)
	}
	if n := testutil.ToFloat64(h.svc.supersededAhead); n != 4 {
		t.Errorf("verifies answered superseded ahead of the projection: %v, want 4", n)
	}
	if r, e := verify("other", "000000"); e != "" || r.Status != events.StatusInvalidCode {
		t.Fatalf("another request's wrong guess: %+v, error %q", r, e)
	}

	// The projection catches up: the old code is superseded in the database, the newer one
	// verifies.
	stalled.Store(false)
	close(release)
	testenv.Eventually(t, 10*time.Second, "the supersession projected", func() bool {
		status, _ := row(ch(300))
		return status == statusSuperseded
	})
	if r, e := verify("old", "111111"); r.Status != events.StatusSuperseded {
		t.Fatalf("the superseded code once projected: %+v, error %q", r, e)
	}
	if r, e := verify("new", "222222"); r.Status != events.StatusVerified {
		t.Fatalf("the newer code: %+v, error %q", r, e)
	}
	// The index lets go of what the projection has applied (once it has read the
	// projection's floor again).
	testenv.Eventually(t, 10*time.Second, "the index to drop the applied supersession", func() bool {
		_, err := h.svc.supersessions(t.Context(), "acme", nil, h.svc.floor.known())
		h.svc.index.mu.Lock()
		ts := h.svc.index.tenants["acme"]
		h.svc.index.mu.Unlock()
		ts.reading <- struct{}{}
		defer func() { <-ts.reading }()
		return err == nil && len(ts.ahead) == 0 && len(ts.byRequest) == 0
	})

	// The stream cannot be read: whether a supersession closes a challenge is not known,
	// so the right code fails and writes nothing; a wrong guess is answered.
	testenv.Must(t, h.js.DeleteStream(t.Context(), events.StreamChallenges), "delete %s", events.StreamChallenges)
	if r, e := verify("other", "333333"); e != "500" {
		t.Fatalf("the right code while the stream cannot be read: %+v, error %q; want an error", r, e)
	}
	if r, e := verify("other", "000000"); e != "" || r.Status != events.StatusInvalidCode {
		t.Fatalf("a wrong guess while the stream cannot be read: %+v, error %q", r, e)
	}
	if status, attempts := row(ch(302)); status != statusActive || attempts != 2 {
		t.Fatalf("the other challenge: status %s, %d attempts; want active with the 2 wrong guesses' attempts", status, attempts)
	}
}
