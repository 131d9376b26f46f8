package verifier

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNoAddressOrIPAtRestInTheVerifier: after challenges for an address (two codes, two
// challenges), wrong guesses from an IPv4 and an IPv6 client, a verify limit reached and
// a verification, no table of the verifier holds the address in any case or the IP.
func TestNoAddressOrIPAtRestInTheVerifier(t *testing.T) {
	h := newConfigHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_failures_per_hour: 10}
    risk: {recipient_failures: {failures: 2, window: 1h, max_attempts: 2}}
`, nil, func(c *Config) { c.VerifyIPPerMinute = 3; c.VerifyTenantPerMinute = 100 })
	const ana, ip4, ip6 = "Ana.Lovelace@Example.COM", "203.0.113.77", "2001:db8:7:7::42"
	exp := time.Now().Add(5 * time.Minute)
	h.publishIssued(t, issue{ChallengeID: ch(100), RequestID: "v1", CodeSeq: 1, Recipient: ana, SessionID: "s-1", ExpiresAt: exp}, "111111")
	h.publishIssued(t, issue{ChallengeID: ch(100), RequestID: "v1", CodeSeq: 2, Recipient: ana, SessionID: "s-1", ExpiresAt: exp, Resend: true}, "222222")
	h.waitProjected(t, ch(100), 2)
	for i := range 3 {
		if r := h.verifyFrom(t, "acme", "v1", "000000", ip4); r.Status != events.StatusInvalidCode {
			t.Fatalf("guess %d: %+v", i, r)
		}
	}
	if r := h.verifyFrom(t, "acme", "v1", "000000", ip4); r.Status != events.StatusRateLimited || r.Reason != "ip_per_minute" {
		t.Fatalf("fourth call from the IP: %+v", r)
	}
	h.publishIssued(t, issue{ChallengeID: ch(101), RequestID: "v2", CodeSeq: 1, Recipient: strings.ToLower(ana), ExpiresAt: exp}, "333333")
	h.waitProjected(t, ch(101), 1)
	if r := h.verifyFrom(t, "acme", "v2", "000000", ip6); r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 1 {
		t.Fatalf("guess on the second challenge: %+v, want the risk rule's 2 attempts", r)
	}
	if r := h.verifyFrom(t, "acme", "v2", "333333", ip6); r.Status != events.StatusVerified {
		t.Fatalf("right code: %+v", r)
	}
	testenv.Eventually(t, 10*time.Second, "the outbox published", func() bool {
		var n int
		return h.pool.QueryRow(context.Background(), `SELECT count(*) FROM verifier.outbox`).Scan(&n) == nil && n == 0
	})

	dump, counts := testenv.DumpSchema(t, h.pool, Schema)
	for _, table := range []string{"challenges", "codes", "recipient_failures", "verify_limits"} {
		if counts[table] == 0 {
			t.Fatalf("no %s rows: the check would prove nothing\n%s", table, dump)
		}
	}
	testenv.AssertNoPlaintext(t, dump, ana, "lovelace", ip4, "2001:db8:7:7", "2001:0db8")
	if !strings.Contains(dump, h.subjects.Subject("acme", ana)) {
		t.Fatalf("the recipient is not known by its subject hash:\n%s", dump)
	}
}

// TestFailureCapAndVerifyLimitHoldAcrossSubjectKeyRotation: failures and verify calls
// under k1, then the verifier restarts with OTP_SUBJECT_KEY=k2:NEW,k1:OLD. The per-
// recipient failure cap and the per-IP verify limit still count what happened under k1.
func TestFailureCapAndVerifyLimitHoldAcrossSubjectKeyRotation(t *testing.T) {
	const doc = `
tenants:
  acme:
    rate_limits: {recipient_failures_per_hour: 4}
    risk: {recipient_failures: {failures: 0}}
`
	oldKey := keys.Generate("k1", 32)
	old, err := keys.ParseSubjects(oldKey)
	testenv.Must(t, err, "old subject key")
	rotated, err := keys.ParseSubjects(keys.Generate("k2", 32) + "," + oldKey)
	testenv.Must(t, err, "rotated subject key")
	tune := func(s *keys.Subjects) func(*Config) {
		return func(c *Config) { c.Subjects, c.VerifyIPPerMinute = s, 4 }
	}
	h := newConfigHarness(t, doc, nil, tune(old))
	const ip = "198.51.100.23"
	exp := time.Now().Add(5 * time.Minute)
	h.publishIssued(t, issue{ChallengeID: ch(110), RequestID: "a", CodeSeq: 1, Recipient: "ana@example.com", ExpiresAt: exp}, "111111")
	h.waitProjected(t, ch(110), 1)
	for i := range 3 {
		if r := h.verifyFrom(t, "acme", "a", "000000", ip); r.Status != events.StatusInvalidCode {
			t.Fatalf("guess %d under k1: %+v", i, r)
		}
	}

	h.stops[0]()
	h.replica(t, doc, nil, tune(rotated))
	h.publishIssued(t, issue{ChallengeID: ch(111), RequestID: "b", CodeSeq: 1, Recipient: "ANA@example.com", ExpiresAt: exp}, "222222")
	h.waitProjected(t, ch(111), 1)
	if r := h.verifyFrom(t, "acme", "b", "000000", ip); r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 4 {
		t.Fatalf("fourth failure, after the rotation: %+v", r)
	}
	if r := h.verifyFrom(t, "acme", "b", "222222", ip); r.Status != events.StatusRateLimited || r.Reason != "ip_per_minute" {
		t.Fatalf("fifth call from the IP, after the rotation: %+v, want rate_limited (ip_per_minute)", r)
	}
	if r := h.verifyFrom(t, "acme", "b", "222222", "192.0.2.200"); r.Status != events.StatusLocked || r.Reason != "recipient_failures" {
		t.Fatalf("the right code after 4 failures across the rotation: %+v, want locked (recipient_failures)", r)
	}
	// The new challenge knows the recipient under both keys; both rows hold every failure.
	var keysOf []string
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT recipient_keys FROM verifier.challenges WHERE challenge_id = $1`, ch(111)).Scan(&keysOf), "keys")
	if want := rotated.SubjectHashes("acme", "ana@example.com"); strings.Join(keysOf, ",") != strings.Join(want, ",") {
		t.Fatalf("recipient keys %q, want %q", keysOf, want)
	}
	rows, err := h.pool.Query(t.Context(), `SELECT cardinality(stamps) FROM verifier.recipient_failures ORDER BY recipient_key`)
	testenv.Must(t, err, "failure rows")
	counts, err := pgx.CollectRows(rows, pgx.RowTo[int])
	testenv.Must(t, err, "failure rows")
	if len(counts) != 2 || counts[0] != 4 || counts[1] != 4 {
		t.Fatalf("failure rows hold %v stamps, want 4 under each key", counts)
	}
}

// TestRotationCountsEachFailureOnce: failures recorded during a rotation land under every
// key and are merged when read, so each counts once. With a cap of 6, two failures before
// the rotation and two after leave the right code verifying; counting both keys' rows in
// full would lock the recipient already.
func TestRotationCountsEachFailureOnce(t *testing.T) {
	const doc = `
tenants:
  acme:
    rate_limits: {recipient_failures_per_hour: 6}
    risk: {recipient_failures: {failures: 0}}
`
	oldKey := keys.Generate("k1", 32)
	old, err := keys.ParseSubjects(oldKey)
	testenv.Must(t, err, "old subject key")
	rotated, err := keys.ParseSubjects(keys.Generate("k2", 32) + "," + oldKey)
	testenv.Must(t, err, "rotated subject key")
	tune := func(s *keys.Subjects) func(*Config) {
		return func(c *Config) { c.Subjects, c.VerifyIPPerMinute = s, 100 }
	}
	h := newConfigHarness(t, doc, nil, tune(old))
	exp := time.Now().Add(5 * time.Minute)
	h.publishIssued(t, issue{ChallengeID: ch(120), RequestID: "a", CodeSeq: 1, Recipient: "ana@example.com", ExpiresAt: exp, MaxAttempts: 10}, "111111")
	h.waitProjected(t, ch(120), 1)
	for i := range 2 {
		if r := h.verifyFrom(t, "acme", "a", "000000", "198.51.100.1"); r.Status != events.StatusInvalidCode {
			t.Fatalf("guess %d under k1: %+v", i, r)
		}
	}
	h.stops[0]()
	h.replica(t, doc, nil, tune(rotated))
	h.publishIssued(t, issue{ChallengeID: ch(121), RequestID: "b", CodeSeq: 1, Recipient: "ana@example.com", ExpiresAt: exp, MaxAttempts: 10}, "222222")
	h.waitProjected(t, ch(121), 1)
	for i := range 2 {
		if r := h.verifyFrom(t, "acme", "b", "000000", "198.51.100.1"); r.Status != events.StatusInvalidCode {
			t.Fatalf("guess %d after the rotation: %+v", i, r)
		}
	}
	if r := h.verifyFrom(t, "acme", "b", "222222", "198.51.100.1"); r.Status != events.StatusVerified {
		t.Fatalf("the right code after 4 failures of a cap of 6: %+v, want verified", r)
	}
}
