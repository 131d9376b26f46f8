package issuer

import (
	"context"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/testenv"
)

func (h *harness) rejections(t *testing.T, n int) []events.Rejected {
	t.Helper()
	var out []events.Rejected
	for _, m := range testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.rejected.*", n, 10*time.Second) {
		out = append(out, decode[events.Rejected](t, m))
	}
	return out
}

func (h *harness) issued(t *testing.T, n int) []events.Issued {
	t.Helper()
	var out []events.Issued
	for _, m := range testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.*", n, 10*time.Second) {
		out = append(out, decode[events.Issued](t, m))
	}
	return out
}

func TestTenantCodeShapeLifetimeAndPurposes(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    code_length: 8
    alphabet: "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    ttl: 2m
    max_ttl: 4m
    max_attempts: 3
    purposes: [login]
    locale: de
`)
	h.request(t, `{"request_id":"p1","recipient":"ana@example.com","purpose":"login"}`)
	job := h.openJob(t, testenv.WaitMessages(t, h.js, events.StreamDispatch, "otp.dispatch.acme", 1, 10*time.Second)[0])
	code := job.Code
	if p := (policy.Policy{CodeLength: 8, Alphabet: "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"}); !p.IsCode(code) {
		t.Fatalf("code %q is not 8 of the tenant alphabet", code)
	}
	is := h.issued(t, 1)[0]
	if is.MaxAttempts != 3 || is.ExpiresAt.Sub(is.IssuedAt) != 2*time.Minute || is.Locale != "de" || job.Locale != "de" || is.CodeLength != 8 {
		t.Fatalf("issued = %+v", is)
	}
	h.request(t, `{"request_id":"p2","recipient":"bo@example.com","purpose":"payment"}`)
	h.request(t, `{"request_id":"p3","recipient":"cy@example.com","purpose":"login","ttl_seconds":600}`)
	rej := h.rejections(t, 2)
	if rej[0].Reason != events.ReasonPolicy || rej[0].Field != "purpose" || rej[1].Reason != events.ReasonPolicy || rej[1].Field != "ttl_seconds" {
		t.Fatalf("rejections = %+v", rej)
	}
}

// TestCodesWithATenantAlphabetAreUniform: the chi-square test over a 32-letter alphabet.
func TestCodesWithATenantAlphabetAreUniform(t *testing.T) {
	const alphabet, n = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789", 64_000
	counts := map[rune]int{}
	for range n / 8 {
		c, err := newCode(8, alphabet)
		testenv.Must(t, err, "code")
		for _, r := range c {
			counts[r]++
		}
	}
	chi, e := 0.0, float64(n)/32
	for _, r := range alphabet {
		chi += (float64(counts[r]) - e) * (float64(counts[r]) - e) / e
	}
	if chi > 61.1 { // 31 degrees of freedom, 0.01% critical value
		t.Fatalf("chi-square %.1f: not uniform %v", chi, counts)
	}
}

func TestRecipientCooldownHourlyCapIPAndTenantLimits(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_cooldown: 30s, recipient_per_hour: 3, ip_per_minute: 2, tenant_per_minute: 4}
    risk: {ip_fanout: {recipients: 0}}
`)
	// Recipient: a new request_id for the same address and purpose within 30 s.
	h.request(t, `{"request_id":"c1","recipient":"ana@example.com","purpose":"login"}`)
	h.request(t, `{"request_id":"c2","recipient":"ana@example.com","purpose":"login"}`)
	rej := h.rejections(t, 1)[0]
	if rej.Reason != events.ReasonRateLimited || rej.Limit != "recipient_cooldown" || rej.RetryAfterSeconds < 29 || rej.RetryAfterSeconds > 30 {
		t.Fatalf("cooldown: %+v", rej)
	}
	// Another purpose is another key.
	h.request(t, `{"request_id":"c3","recipient":"ana@example.com","purpose":"signup"}`)
	h.issued(t, 2)
	// Hourly cap of 3 for (ana, login).
	for i, id := range []string{"c4", "c5"} {
		h.advance(31 * time.Second)
		h.request(t, fmt.Sprintf(`{"request_id":%q,"recipient":"ana@example.com","purpose":"login"}`, id))
		h.issued(t, 3+i)
	}
	h.advance(31 * time.Second)
	h.request(t, `{"request_id":"c6","recipient":"ana@example.com","purpose":"login"}`)
	rej = h.rejections(t, 2)[1]
	if rej.Limit != "recipient_per_hour" || rej.RetryAfterSeconds < 3500 || rej.RetryAfterSeconds > 3600 {
		t.Fatalf("hourly cap: %+v", rej)
	}
	// IP: 2 per minute whatever the recipient.
	h.advance(time.Minute)
	h.request(t, `{"request_id":"i1","recipient":"x1@example.com","purpose":"login","context":{"ip":"198.51.100.9"}}`)
	h.request(t, `{"request_id":"i2","recipient":"x2@example.com","purpose":"login","context":{"ip":"198.51.100.9"}}`)
	h.request(t, `{"request_id":"i3","recipient":"x3@example.com","purpose":"login","context":{"ip":"198.51.100.9"}}`)
	rej = h.rejections(t, 3)[2]
	if rej.Limit != "ip_per_minute" || rej.RequestID != "i3" {
		t.Fatalf("ip limit: %+v", rej)
	}
	// Tenant: 4 per minute; i1 and i2 counted, so the fifth send this minute is refused.
	h.request(t, `{"request_id":"t1","recipient":"y1@example.com","purpose":"login"}`)
	h.request(t, `{"request_id":"t2","recipient":"y2@example.com","purpose":"login"}`)
	h.request(t, `{"request_id":"t3","recipient":"y3@example.com","purpose":"login"}`)
	rej = h.rejections(t, 4)[3]
	if rej.Limit != "tenant_per_minute" || rej.RequestID != "t3" {
		t.Fatalf("tenant limit: %+v", rej)
	}
}

// TestTwoIssuersRacingOnOneRecipient: two issuer processes (own connections) share the
// database; requests for one address arrive at both at once. The cooldown and the hourly
// cap hold across them.
func TestTwoIssuersRacingOnOneRecipient(t *testing.T) {
	srv := testenv.NATS(t)
	_, js := testenv.JetStream(t, srv)
	pool := testenv.Postgres(t, Spec())
	pepper, _ := keys.ParsePepper(keys.Generate("p1", 32))
	sealer, _ := keys.ParseSealer(keys.Generate("s1", 32))
	subjects, _ := keys.ParseSubjects(keys.Generate("k1", 32))
	var mu sync.Mutex
	var skew time.Duration
	clock := func() time.Duration { mu.Lock(); defer mu.Unlock(); return skew }
	for range 2 {
		// Each issuer has its own NATS connection and its own PostgreSQL pool, as two
		// processes would.
		_, js2 := testenv.JetStream(t, srv)
		own, err := pgxpool.New(context.Background(), pool.Config().ConnString())
		testenv.Must(t, err, "pool")
		t.Cleanup(own.Close)
		svc, err := New(Config{Pepper: pepper, Sealer: sealer, Subjects: subjects, BatchSize: 5, DLQKey: testenv.DLQKey(t)}, own, js2, testenv.Logger(io.Discard), nil)
		testenv.Must(t, err, "issuer")
		svc.skew = clock
		testenv.Start(t, svc.Run)
	}
	round := func(r, n int) {
		for i := range n {
			_, err := js.PublishAsync("otp.requested.acme", []byte(fmt.Sprintf(`{"request_id":"race-%d-%d","recipient":"Ana@Example.com","purpose":"login"}`, r, i)))
			testenv.Must(t, err, "publish")
		}
		<-js.PublishAsyncComplete()
	}
	settled := func(n int) {
		testenv.Eventually(t, 20*time.Second, "every request settled", func() bool {
			return len(testenv.Messages(t, js, events.StreamEvents, "otp.issued.acme"))+len(testenv.Messages(t, js, events.StreamEvents, "otp.rejected.acme")) == n
		})
	}
	round(0, 40)
	settled(40)
	if n := len(testenv.Messages(t, js, events.StreamEvents, "otp.issued.acme")); n != 1 {
		t.Fatalf("%d codes issued inside one cooldown by two racing issuers, want 1", n)
	}
	for r := 1; r <= 6; r++ {
		mu.Lock()
		skew += 31 * time.Second
		mu.Unlock()
		round(r, 10)
		settled(40 + 10*r)
	}
	// 7 cooldown windows but an hourly cap of 5.
	if n := len(testenv.Messages(t, js, events.StreamEvents, "otp.issued.acme")); n != 5 {
		t.Fatalf("%d codes issued in the hour, want the cap of 5", n)
	}
	for _, m := range testenv.Messages(t, js, events.StreamEvents, "otp.rejected.acme") {
		if r := decode[events.Rejected](t, m); r.Reason != events.ReasonRateLimited {
			t.Fatalf("unexpected rejection %+v", r)
		}
	}
}

func TestTestRecipientsGetAFixedCodeAndNoMail(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    test_recipients:
      qa@acme.test: "000111"
`)
	h.request(t, `{"request_id":"qa-0","recipient":"qa@acme.test","purpose":"login"}`)
	h.issued(t, 1)
	h.advance(31 * time.Second)
	h.request(t, `{"request_id":"qa-1","recipient":"QA@acme.test","purpose":"login"}`)
	h.issued(t, 2)
	h.advance(31 * time.Second)
	h.request(t, `{"request_id":"real","recipient":"qa@acme.example","purpose":"login"}`)
	issued := h.issued(t, 3)
	challenges := testenv.WaitMessages(t, h.js, events.StreamChallenges, "otp.challenge.*", 3, 10*time.Second)
	for i, is := range issued[:2] {
		ch := decode[events.Challenge](t, challenges[i])
		if !is.Test || !ch.Test {
			t.Fatalf("test recipient not marked: %+v, %+v", is, ch)
		}
		if ok, _ := h.pepper.Equal(ch.PepperKeyID, ch.ChallengeID, "000111", ch.CodeHMAC); !ok {
			t.Fatal("the test recipient's code is not the fixed one")
		}
	}
	if issued[2].Test {
		t.Fatal("a recipient the policy does not name was treated as a test recipient")
	}
	// The real request came last and the outbox publishes in order: had a test
	// recipient's job been published, it would be on the stream before this one.
	jobs := testenv.WaitMessages(t, h.js, events.StreamDispatch, "", 1, 10*time.Second)
	if len(jobs) != 1 || h.openJob(t, jobs[0]).Recipient != "qa@acme.example" {
		t.Fatalf("%d dispatch jobs, want only the real recipient's", len(jobs))
	}
	superseded := testenv.Messages(t, h.js, events.StreamEvents, "otp.superseded.acme")
	if len(superseded) != 1 || !decode[events.Superseded](t, superseded[0]).Test {
		t.Fatalf("%d superseded events for the test recipient, want 1 marked test", len(superseded))
	}
}

// TestTestRecipientsObeyTheRateLimits: a fixed code is a known secret only to the tenant's
// QA; an attacker who learns a test address must not get unlimited fresh challenges to
// guess against. Cycling request ids hits the recipient limits as for any address.
func TestTestRecipientsObeyTheRateLimits(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    test_recipients:
      qa@acme.test: "000111"
`)
	for i := range 8 {
		h.request(t, fmt.Sprintf(`{"request_id":"cycle-%d","recipient":"qa@acme.test","purpose":"login","context":{"ip":"198.51.100.7"}}`, i))
		testenv.Eventually(t, 10*time.Second, "the request settled", func() bool {
			return len(testenv.Messages(t, h.js, events.StreamEvents, "otp.issued.acme"))+len(testenv.Messages(t, h.js, events.StreamEvents, "otp.rejected.acme")) == i+1
		})
		if i%2 == 1 {
			h.advance(31 * time.Second)
		}
	}
	rejected := testenv.Messages(t, h.js, events.StreamEvents, "otp.rejected.acme")
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.issued.acme")); n != 4 {
		t.Fatalf("%d challenges for a test recipient in 4 cooldown windows, want 4 (one per window)", n)
	}
	for _, m := range rejected {
		if r := decode[events.Rejected](t, m); r.Reason != events.ReasonRateLimited || r.Limit != "recipient_cooldown" {
			t.Fatalf("rejection %+v, want rate_limited/recipient_cooldown", r)
		}
	}
}

func TestSupersedeAndRiskRules(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_cooldown: 0s, recipient_per_hour: 0, ip_per_minute: 0}
    risk:
      ip_fanout: {recipients: 2, window: 10m}
      recipient_burst: {challenges: 2, window: 10m, ttl: 1m, max_attempts: 2}
`)
	// Supersede: a new request for the same recipient and purpose replaces the older one.
	h.request(t, `{"request_id":"s1","recipient":"ana@example.com","purpose":"login"}`)
	h.request(t, `{"request_id":"s2","recipient":"ana@example.com","purpose":"login"}`)
	sup := decode[events.Superseded](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.superseded.acme", 1, 10*time.Second)[0])
	first := h.issued(t, 2)[0]
	if sup.ChallengeID != first.ChallengeID || sup.RequestID != "s1" || sup.SupersededBy != "s2" {
		t.Fatalf("superseded = %+v", sup)
	}
	// A resend of the superseded challenge is refused.
	h.request(t, `{"request_id":"s1","recipient":"ana@example.com","purpose":"login","resend":true}`)
	if r := h.rejections(t, 1)[0]; r.Reason != events.ReasonChallengeClosed {
		t.Fatalf("resend of a superseded challenge: %+v", r)
	}
	// recipient_burst: the third challenge within 10 minutes gets 1 minute and 2 attempts.
	h.request(t, `{"request_id":"s3","recipient":"ana@example.com","purpose":"login"}`)
	third := h.issued(t, 3)[2]
	if third.ExpiresAt.Sub(third.IssuedAt) != time.Minute || third.MaxAttempts != 2 || len(third.Risk) != 1 || third.Risk[0] != "recipient_burst" {
		t.Fatalf("third challenge = %+v", third)
	}
	// ip_fanout: one IP, a third distinct recipient within the window is refused.
	for i := range 3 {
		h.request(t, fmt.Sprintf(`{"request_id":"f%d","recipient":"f%d@example.com","purpose":"login","context":{"ip":"203.0.113.50"}}`, i, i))
	}
	r := h.rejections(t, 2)[1]
	if r.Reason != events.ReasonRisk || r.Limit != "ip_fanout" || r.RequestID != "f2" || r.RetryAfterSeconds != 600 {
		t.Fatalf("fanout: %+v", r)
	}
	// The same recipients from that IP are still served.
	h.request(t, `{"request_id":"f0b","recipient":"f0@example.com","purpose":"login","context":{"ip":"203.0.113.50"}}`)
	h.issued(t, 6)
}

func TestRetentionPurge(t *testing.T) {
	h := newHarness(t)
	// "old" is issued 26 hours ago, then the clock comes back to now: moving the issuer's
	// clock ahead instead would make "new" wait 26 hours on OTP_REQUESTS, and stale.
	h.advance(-26 * time.Hour)
	h.request(t, `{"request_id":"old","recipient":"old@example.com","purpose":"login","context":{"ip":"198.51.100.1"}}`)
	h.issued(t, 1)
	h.advance(26 * time.Hour)
	h.request(t, `{"request_id":"new","recipient":"new@example.com","purpose":"login"}`)
	h.issued(t, 2)
	count := func(q string) (n int) {
		testenv.Must(t, h.pool.QueryRow(context.Background(), q).Scan(&n), "%s", q)
		return n
	}
	n, err := h.svc.Purge(context.Background())
	testenv.Must(t, err, "purge")
	if n == 0 || count(`SELECT count(*) FROM issuer.challenges WHERE request_id = 'old'`) != 0 || count(`SELECT count(*) FROM issuer.codes`) != 1 {
		t.Fatalf("purged %d rows; old challenge or its code still there", n)
	}
	if count(`SELECT count(*) FROM issuer.challenges WHERE request_id = 'new'`) != 1 {
		t.Fatal("the live challenge was purged")
	}
	if count(`SELECT count(*) FROM issuer.ip_recipients`) != 0 || count(`SELECT count(*) FROM issuer.rate_log WHERE key LIKE 'ip|%'`) != 0 {
		t.Fatal("old rate-limit state kept")
	}
	if count(`SELECT count(*) FROM issuer.rate_log WHERE key = '`+rcptRate("acme", h.subjects.Subject("acme", "new@example.com"), "login")+`'`) != 1 {
		t.Fatal("live rate-limit state purged")
	}
}
