package issuer

import (
	"context"
	"encoding/json"
	"io"
	"math"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

type harness struct {
	js     jetstream.JetStream
	pool   *pgxpool.Pool
	pepper *keys.Pepper
	sealer *keys.Sealer
	// subjects is the OTP_SUBJECT_KEY ring of the running issuer.
	subjects *keys.Subjects
	policies *policy.Set
	stop     func()
	mu       sync.Mutex
	skew     time.Duration
	svc      *Service
	// dlq is the OTP_DLQ_KEY of the running issuer; tune, when set, adjusts its Config.
	dlq  *keys.Sealer
	tune func(*Config)
	// reg gets the running issuer's metrics when set; subjectKey is its OTP_SUBJECT_KEY.
	reg        *prometheus.Registry
	subjectKey string
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	return newPolicyHarness(t, "")
}

// newPolicyHarness runs an issuer with the tenant policy file doc.
func newPolicyHarness(t *testing.T, doc string) *harness {
	t.Helper()
	return newPolicyHarnessTB(t, doc)
}

func newPolicyHarnessTB(t testing.TB, doc string) *harness {
	t.Helper()
	return newTunedHarness(t, doc, nil, nil)
}

// newTunedHarness runs an issuer with the tenant policy file doc, its Config adjusted by
// tune and its metrics in reg (both optional).
func newTunedHarness(t testing.TB, doc string, tune func(*Config), reg *prometheus.Registry) *harness {
	t.Helper()
	policies, err := policy.Parse([]byte(doc))
	testenv.Must(t, err, "policy")
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	pepper, err := keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	sealer, err := keys.ParseSealer(keys.Generate("s1", 32))
	testenv.Must(t, err, "sealer")
	h := &harness{js: js, pool: pool, pepper: pepper, sealer: sealer, policies: policies, tune: tune, reg: reg}
	h.start(t, keys.Generate("k1", 32))
	return h
}

// start runs an issuer with the subject key ring subjectKey, stopping the one running.
func (h *harness) start(t testing.TB, subjectKey string) {
	t.Helper()
	if h.stop != nil {
		h.stop()
	}
	subjects, err := keys.ParseSubjects(subjectKey)
	testenv.Must(t, err, "subject key")
	if h.dlq == nil {
		h.dlq = testenv.DLQKey(t)
	}
	cfg := Config{Pepper: h.pepper, Sealer: h.sealer, Subjects: subjects, Policies: h.policies, DLQKey: h.dlq}
	if h.tune != nil {
		h.tune(&cfg)
	}
	var reg prometheus.Registerer
	if h.reg != nil {
		reg = h.reg
	}
	svc, err := New(cfg, h.pool, h.js, testenv.Logger(io.Discard), reg)
	testenv.Must(t, err, "new issuer")
	svc.skew = func() time.Duration { h.mu.Lock(); defer h.mu.Unlock(); return h.skew }
	h.svc, h.subjects, h.subjectKey = svc, subjects, subjectKey
	h.stop = testenv.Start(t, svc.Run)
}

// advance moves the issuer's (database) clock forward by d.
func (h *harness) advance(d time.Duration) { h.mu.Lock(); h.skew += d; h.mu.Unlock() }

// openJob unseals a dispatch job as the dispatcher would.
func (h *harness) openJob(t *testing.T, m *jetstream.RawStreamMsg) events.DispatchJob {
	t.Helper()
	sealed, err := events.DecodeSealedDispatch(m.Data)
	testenv.Must(t, err, "decode sealed job")
	job, err := h.sealer.OpenJob(sealed)
	testenv.Must(t, err, "open sealed job")
	return job
}

func (h *harness) request(t *testing.T, body string) {
	t.Helper()
	_, err := h.js.Publish(context.Background(), "otp.requested.acme", []byte(body))
	testenv.Must(t, err, "publish")
}

func decode[T any](t *testing.T, m *jetstream.RawStreamMsg) T {
	t.Helper()
	var v T
	testenv.Must(t, json.Unmarshal(m.Data, &v), "decode %s", m.Subject)
	return v
}

func TestIssueSealsTheCodeAndPublishesOnlyItsMAC(t *testing.T) {
	h := newHarness(t)
	h.request(t, `{"request_id":"r1","recipient":"Ana@example.com","purpose":"login","ttl_seconds":120,"context":{"session_id":"s-1","ip":"203.0.113.7"}}`)
	jobs := testenv.WaitMessages(t, h.js, events.StreamDispatch, "otp.dispatch.acme", 1, 10*time.Second)
	challenges := testenv.WaitMessages(t, h.js, events.StreamChallenges, "otp.challenge.acme", 1, 10*time.Second)
	issued := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", 1, 10*time.Second)
	job := h.openJob(t, jobs[0])
	ch := decode[events.Challenge](t, challenges[0])
	is := decode[events.Issued](t, issued[0])

	code := job.Code
	if len(code) != 6 || strings.Trim(code, "0123456789") != "" {
		t.Fatalf("code %q is not 6 digits", code)
	}
	// The verifier's feed carries the HMAC, the session and the recipient's hashes.
	if ok, _ := h.pepper.Equal(ch.PepperKeyID, ch.ChallengeID, code, ch.CodeHMAC); !ok {
		t.Fatal("the challenge's HMAC does not match the sealed code")
	}
	if ch.ChallengeID != job.ChallengeID || ch.SessionID != "s-1" || ch.MaxAttempts != 5 || ch.CodeLength != 6 ||
		ch.ExpiresAt.Sub(ch.IssuedAt) != 120*time.Second || !slices.Equal(ch.RecipientHashes, h.subjects.SubjectHashes("acme", "ana@example.com")) {
		t.Fatalf("challenge = %+v", ch)
	}
	// The audit's record: hashes and the masked form, nothing that verifies or names.
	if is.ChallengeID != job.ChallengeID || is.MaxAttempts != 5 || is.ExpiresAt.Sub(is.IssuedAt) != 120*time.Second ||
		is.RecipientHash != h.subjects.Subject("acme", "ana@example.com") || is.RecipientMasked != "A***@example.com" ||
		is.ClientHash != h.subjects.Client("acme", "203.0.113.7") {
		t.Fatalf("issued = %+v", is)
	}
	//lint:ignore SA1019 the deprecated fields must stay empty
	if is.Recipient != "" || is.CodeHMAC != nil || is.PepperKeyID != "" || is.SessionID != "" || is.ClientIP != "" {
		t.Fatalf("otp.issued carries a deprecated field: %+v", is)
	}
	for _, f := range []string{`"recipient"`, `"code_hmac"`, `"pepper_key_id"`, `"session_id"`, `"client_ip"`, "s-1", "203.0.113.7", "Ana@example.com"} {
		if strings.Contains(string(issued[0].Data), f) {
			t.Fatalf("otp.issued holds %s: %s", f, issued[0].Data)
		}
	}
	for _, m := range append(append(jobs, issued...), challenges...) {
		if strings.Contains(string(m.Data), code) {
			t.Fatalf("%s carries the code in clear", m.Subject)
		}
		if m.Header.Get(events.HeaderID) != m.Header.Get(jetstream.MsgIDHeader) || m.Header.Get(events.HeaderSpecVersion) != "1.0" ||
			m.Header.Get(events.HeaderTraceParent) == "" || m.Header.Get(events.HeaderType) == "" {
			t.Fatalf("%s lacks CloudEvents headers: %v", m.Subject, m.Header)
		}
	}
	// No tracer and a request without a traceparent: its messages are still one trace.
	for _, m := range append(issued, challenges...) {
		if m.Header.Get(events.HeaderTraceParent) != jobs[0].Header.Get(events.HeaderTraceParent) {
			t.Fatalf("%s traceparent %s, the dispatch job's %s", m.Subject, m.Header.Get(events.HeaderTraceParent), jobs[0].Header.Get(events.HeaderTraceParent))
		}
	}
	var rows int
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT count(*) FROM issuer.outbox`).Scan(&rows), "outbox")
	if rows != 0 {
		t.Fatalf("%d outbox rows left after publishing; the sealed code must not stay at rest", rows)
	}
}

func TestResendCooldownAndCap(t *testing.T) {
	h := newHarness(t)
	const body = `{"request_id":"r2","recipient":"bo@example.com","purpose":"login","resend":true}`
	h.request(t, body) // first request: a new challenge even with resend set
	testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", 1, 10*time.Second)

	h.request(t, body) // too soon
	rej := decode[events.Rejected](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.rejected.acme", 1, 10*time.Second)[0])
	if rej.Reason != events.ReasonRateLimited || rej.RetryAfterSeconds < 1 || rej.RetryAfterSeconds > 30 {
		t.Fatalf("early resend: %+v", rej)
	}
	for i := 2; i <= 5; i++ {
		h.advance(31 * time.Second)
		h.request(t, body)
		got := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", i, 10*time.Second)
		if is := decode[events.Issued](t, got[i-1]); is.CodeSeq != i || !is.Resend {
			t.Fatalf("resend %d: %+v", i, is)
		}
	}
	h.advance(31 * time.Second)
	h.request(t, body) // a sixth code: over the cap
	rej = decode[events.Rejected](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.rejected.acme", 2, 10*time.Second)[1])
	if rej.Reason != events.ReasonRateLimited || !strings.Contains(rej.Detail, "cap") {
		t.Fatalf("sixth code: %+v", rej)
	}
	var challenges int
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT count(*) FROM issuer.challenges`).Scan(&challenges), "count")
	if challenges != 1 {
		t.Fatalf("%d challenges, want 1", challenges)
	}
}

// TestCodesAreUniform draws many codes and checks every digit position with a chi-square
// test (9 degrees of freedom; 33.72 is the 0.01% critical value), so a modulo bias or a
// stuck digit fails it.
func TestCodesAreUniform(t *testing.T) {
	const n = 60_000
	var counts [6][10]int
	for range n {
		c, err := newCode(6, "0123456789")
		testenv.Must(t, err, "code")
		if len(c) != 6 {
			t.Fatalf("code %q", c)
		}
		for i, d := range c {
			counts[i][d-'0']++
		}
	}
	for pos, row := range counts {
		chi := 0.0
		for _, k := range row {
			e := float64(n) / 10
			chi += math.Pow(float64(k)-e, 2) / e
		}
		if chi > 33.72 {
			t.Errorf("digit %d: chi-square %.1f over 33.72: %v", pos, chi, row)
		}
	}
}
