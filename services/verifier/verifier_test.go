package verifier

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/testenv"
)

type harness struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	pool   *pgxpool.Pool
	pepper *keys.Pepper
	// subjects is the OTP_SUBJECT_KEY ring replicas get unless tuned otherwise.
	subjects *keys.Subjects
	// dlq is the OTP_DLQ_KEY of every replica.
	dlq *keys.Sealer
	// issuerRing is the ring the recipient hashes of published challenges are made
	// under: the last replica's, as if the issuers had rolled out with it.
	issuerRing *keys.Subjects
	svc        *Service
	clock      *clock
	// stops stops each replica, in the order started.
	stops []func()
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time  { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) set(t time.Time) { c.mu.Lock(); c.t = t; c.mu.Unlock() }

func newHarness(t testing.TB) *harness {
	t.Helper()
	return newPolicyHarness(t, "", nil)
}

// newPolicyHarness runs a verifier with the tenant policy file doc; beforeProject, when
// set, runs before each projected batch.
func newPolicyHarness(t testing.TB, doc string, beforeProject func()) *harness {
	t.Helper()
	return newConfigHarness(t, doc, beforeProject, nil)
}

// newConfigHarness is newPolicyHarness with tune, when set, adjusting the Config.
func newConfigHarness(t testing.TB, doc string, beforeProject func(), tune func(*Config)) *harness {
	t.Helper()
	nc, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	pepper, err := keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subject key")
	h := &harness{nc: nc, js: js, pool: pool, pepper: pepper, subjects: subjects, dlq: testenv.DLQKey(t)}
	h.svc, h.clock = h.replica(t, doc, beforeProject, tune)
	return h
}

// replica starts one more verifier process on the harness's NATS and database (the
// first one when h.svc is nil) and waits until it serves.
func (h *harness) replica(t testing.TB, doc string, beforeProject func(), tune func(*Config)) (*Service, *clock) {
	t.Helper()
	policies, err := policy.Parse([]byte(doc))
	testenv.Must(t, err, "policy")
	cfg := Config{Pepper: h.pepper, Subjects: h.subjects, Policies: policies, DLQKey: h.dlq}
	if tune != nil {
		tune(&cfg)
	}
	h.issuerRing = cfg.Subjects
	svc, err := New(cfg, h.pool, h.nc, h.js, testenv.Logger(io.Discard), nil)
	testenv.Must(t, err, "new verifier")
	c := &clock{t: time.Now()}
	svc.now = c.now
	svc.beforeProject = beforeProject
	h.stops = append(h.stops, testenv.Start(t, svc.Run))
	testenv.Eventually(t, 10*time.Second, "the verify service", func() bool {
		_, err := h.nc.Request("$SRV.PING.otp-verifier", nil, time.Second)
		return err == nil
	})
	return svc, c
}

// issue publishes an otp.challenge for code and waits until the verifier projected it.
func (h *harness) issue(t testing.TB, challenge, requestID string, seq int, code, session string, expires time.Time) {
	t.Helper()
	h.publishIssued(t, issue{ChallengeID: challenge, RequestID: requestID, CodeSeq: seq, Recipient: "ana@example.com",
		SessionID: session, ExpiresAt: expires}, code)
	h.waitProjected(t, challenge, seq)
}

// issue is what a test says of one code; publishIssued makes the otp.challenge of it.
type issue struct {
	ChallengeID, RequestID string
	CodeSeq                int
	Recipient, SessionID   string
	ExpiresAt              time.Time
	MaxAttempts            int
	Resend, Test           bool
}

// publishIssued fills e's defaults, the MAC of code and the recipient's subject hashes,
// and publishes it as otp.challenge on OTP_CHALLENGES, as the issuer does.
func (h *harness) publishIssued(t testing.TB, e issue, code string) {
	t.Helper()
	mac, err := h.pepper.MAC("p1", e.ChallengeID, code)
	testenv.Must(t, err, "mac")
	if e.MaxAttempts == 0 {
		e.MaxAttempts = 5
	}
	c := events.Challenge{ChallengeID: e.ChallengeID, Tenant: "acme", RequestID: e.RequestID, CodeSeq: e.CodeSeq, CodeLength: 6,
		CodeHMAC: mac, PepperKeyID: "p1", MaxAttempts: e.MaxAttempts, SessionID: e.SessionID,
		RecipientHashes: h.issuerRing.SubjectHashes("acme", e.Recipient), Resend: e.Resend, IssuedAt: time.Now().UTC(),
		ExpiresAt: e.ExpiresAt, Test: e.Test}
	m, err := events.NewMsg(events.TypeChallenge, "acme", fmt.Sprintf("challenge:%s:%d", e.ChallengeID, e.CodeSeq), e.ChallengeID, c, events.Envelope{Source: "test"})
	testenv.Must(t, err, "msg")
	_, err = h.js.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish challenge")
}

func (h *harness) waitProjected(t testing.TB, challenge string, seq int) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, "projection", func() bool {
		var n int
		_ = h.pool.QueryRow(context.Background(), `SELECT count(*) FROM verifier.codes WHERE challenge_id = $1 AND code_seq = $2`, challenge, seq).Scan(&n)
		return n == 1
	})
}

func (h *harness) verify(t testing.TB, requestID, code, session string) events.VerifyReply {
	t.Helper()
	body, _ := json.Marshal(events.VerifyRequest{RequestID: requestID, Code: code, Context: events.VerifyContext{SessionID: session}})
	msg, err := h.nc.Request("otp.verify.acme", body, 5*time.Second)
	testenv.Must(t, err, "verify")
	var r events.VerifyReply
	testenv.Must(t, json.Unmarshal(msg.Data, &r), "reply %q", msg.Data)
	return r
}

func TestConcurrentWrongGuessesCountExactly(t *testing.T) {
	h := newHarness(t)
	const challenge = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
	h.issue(t, challenge, "r1", 1, "493027", "", time.Now().Add(5*time.Minute))

	const guesses = 20
	replies := make(chan events.VerifyReply, guesses)
	var wg sync.WaitGroup
	for range guesses {
		wg.Add(1)
		go func() { defer wg.Done(); replies <- h.verify(t, "r1", "000000", "") }()
	}
	wg.Wait()
	close(replies)
	remaining := map[int]bool{}
	counts := map[events.VerifyStatus]int{}
	for r := range replies {
		counts[r.Status]++
		if r.Status == events.StatusInvalidCode {
			remaining[r.AttemptsRemaining] = true
		}
	}
	if counts[events.StatusInvalidCode] != 5 || counts[events.StatusLocked] != guesses-5 {
		t.Fatalf("replies %v, want 5 invalid_code and %d locked", counts, guesses-5)
	}
	if len(remaining) != 5 {
		t.Fatalf("attempts_remaining values %v, want 4,3,2,1,0 once each", remaining)
	}
	var attempts int
	var status string
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT attempts, status FROM verifier.challenges WHERE challenge_id = $1`, challenge).Scan(&attempts, &status), "read")
	if attempts != 5 || status != "locked" {
		t.Fatalf("attempts %d status %s, want 5 locked", attempts, status)
	}
	if r := h.verify(t, "r1", "493027", ""); r.Status != events.StatusLocked {
		t.Fatalf("right code after lock: %+v", r)
	}
	testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.locked.acme", 1, 10*time.Second)
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.locked.acme")); n != 1 {
		t.Fatalf("%d locked events", n)
	}
}

// TestExpiryUsesTheDatabaseClock: with the verifier's process clock hours off in either
// direction, a code past its expires_at by the database clock answers expired and a live
// one verifies.
func TestExpiryUsesTheDatabaseClock(t *testing.T) {
	for _, tc := range []struct {
		name string
		skew time.Duration
	}{
		{"process clock hours behind", -3 * time.Hour},
		{"process clock hours ahead", 3 * time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			dbNow := h.dbNow(t)
			h.clock.set(time.Now().Add(tc.skew))
			h.issue(t, "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb", "past", 1, "111111", "", dbNow.Add(-time.Second))
			h.issue(t, "cccccccc-cccc-4ccc-8ccc-cccccccccccc", "live", 1, "222222", "", dbNow.Add(time.Hour))
			if r := h.verify(t, "past", "111111", ""); r.Status != events.StatusExpired {
				t.Fatalf("a code past its expiry by the database clock: %+v, want expired", r)
			}
			if r := h.verify(t, "live", "222222", ""); r.Status != events.StatusVerified {
				t.Fatalf("a live code: %+v, want verified", r)
			}
		})
	}
}

func (h *harness) dbNow(t *testing.T) time.Time {
	t.Helper()
	var now time.Time
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT clock_timestamp()`).Scan(&now), "database clock")
	return now
}

func TestResentCodesAndSessionBinding(t *testing.T) {
	h := newHarness(t)
	const challenge = "dddddddd-dddd-4ddd-8ddd-dddddddddddd"
	h.issue(t, challenge, "r4", 1, "111111", "s-1", time.Now().Add(5*time.Minute))
	h.issue(t, challenge, "r4", 2, "222222", "s-1", time.Now().Add(5*time.Minute))

	if r := h.verify(t, "r4", "111111", "other"); r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 4 {
		t.Fatalf("right code from another session: %+v", r)
	}
	// The first code still works after a resend: a slow first mail is not wasted.
	if r := h.verify(t, "r4", "111111", "s-1"); r.Status != events.StatusVerified {
		t.Fatalf("first code after resend: %+v", r)
	}
	if r := h.verify(t, "r4", "222222", "s-1"); r.Status != events.StatusAlreadyUsed {
		t.Fatalf("second code after the first verified: %+v", r)
	}
}

func TestBadRequest(t *testing.T) {
	h := newHarness(t)
	msg, err := h.nc.Request("otp.verify.acme", []byte(`{"request_id":"r","code":"1","extra":true}`), 5*time.Second)
	testenv.Must(t, err, "request")
	var r events.VerifyReply
	testenv.Must(t, json.Unmarshal(msg.Data, &r), "reply")
	if r.Status != events.StatusBadRequest || r.Reason == "" {
		t.Fatalf("reply %+v, want bad_request with a reason", r)
	}
	if r := h.verify(t, "never", "123456", ""); r.Status != events.StatusNotFound {
		t.Fatalf("unknown request: %+v", r)
	}
}
