package verifier

import (
	"encoding/json"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

func ch(i int) string { return fmt.Sprintf("eeeeeeee-eeee-4eee-8eee-%012d", i) }

// TestReadYourWrites: a verify that arrives before the projection has written the
// challenge waits for it instead of answering not_found.
func TestReadYourWrites(t *testing.T) {
	h := newPolicyHarness(t, "", func() { time.Sleep(300 * time.Millisecond) })
	for i := range 3 {
		h.publishIssued(t, issue{ChallengeID: ch(i), RequestID: fmt.Sprintf("ryw-%d", i), CodeSeq: 1,
			Recipient: fmt.Sprintf("r%d@example.com", i), ExpiresAt: time.Now().Add(time.Minute)}, "135790")
		if r := h.verify(t, fmt.Sprintf("ryw-%d", i), "135790", ""); r.Status != events.StatusVerified {
			t.Fatalf("verify right after issue: %+v, want verified", r)
		}
	}
	start := time.Now()
	if r := h.verify(t, "never-issued", "135790", ""); r.Status != events.StatusNotFound {
		t.Fatalf("unknown request: %+v", r)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("not_found took %v", took)
	}
}

func TestRecipientFailureCapAcrossChallenges(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_failures_per_hour: 4}
    risk: {recipient_failures: {failures: 0}}
`, nil)
	exp := time.Now().Add(5 * time.Minute)
	h.issue(t, ch(10), "a", 1, "111111", "", exp)
	for range 3 {
		h.verify(t, "a", "000000", "")
	}
	h.issue(t, ch(11), "b", 1, "222222", "", exp) // a new challenge for the same recipient
	if r := h.verify(t, "b", "000000", ""); r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 4 {
		t.Fatalf("fourth failure: %+v", r)
	}
	r := h.verify(t, "b", "222222", "")
	if r.Status != events.StatusLocked || r.Reason != "recipient_failures" {
		t.Fatalf("after 4 failures for the recipient: %+v, want locked (recipient_failures)", r)
	}
	// Another recipient is not affected; an hour later the recipient is free again.
	h.publishIssued(t, issue{ChallengeID: ch(12), RequestID: "c", CodeSeq: 1, Recipient: "bo@example.com", ExpiresAt: exp.Add(2 * time.Hour)}, "333333")
	h.waitProjected(t, ch(12), 1)
	if r := h.verify(t, "c", "333333", ""); r.Status != events.StatusVerified {
		t.Fatalf("other recipient: %+v", r)
	}
	// Stamps are on the database clock: an hour later is the stamps an hour older.
	_, err := h.pool.Exec(t.Context(), `UPDATE verifier.recipient_failures
		SET stamps = ARRAY(SELECT s - interval '61 minutes' FROM unnest(stamps) AS s ORDER BY s)`)
	testenv.Must(t, err, "age the failures")
	h.issue(t, ch(13), "d", 1, "444444", "", time.Now().Add(2*time.Hour))
	if r := h.verify(t, "d", "444444", ""); r.Status != events.StatusVerified {
		t.Fatalf("an hour later: %+v", r)
	}
}

func TestRiskRecipientFailuresCutsAttempts(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    risk: {recipient_failures: {failures: 2, window: 1h, max_attempts: 2}}
`, nil)
	exp := time.Now().Add(5 * time.Minute)
	h.issue(t, ch(20), "a", 1, "111111", "", exp)
	if r := h.verify(t, "a", "000000", ""); r.AttemptsRemaining != 4 {
		t.Fatalf("first challenge keeps 5 attempts: %+v", r)
	}
	h.verify(t, "a", "000000", "")
	h.issue(t, ch(21), "b", 1, "222222", "", exp)
	if r := h.verify(t, "b", "000000", ""); r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 1 {
		t.Fatalf("after 2 recent failures the new challenge has 2 attempts: %+v", r)
	}
	if r := h.verify(t, "b", "000000", ""); r.AttemptsRemaining != 0 {
		t.Fatalf("%+v", r)
	}
	if r := h.verify(t, "b", "222222", ""); r.Status != events.StatusLocked {
		t.Fatalf("right code after the cut attempts: %+v", r)
	}
}

func TestRecentCodesPolicyAndTestMark(t *testing.T) {
	h := newPolicyHarness(t, "tenants:\n  acme:\n    recent_codes: 1\n", nil)
	exp := time.Now().Add(5 * time.Minute)
	h.issue(t, ch(30), "a", 1, "111111", "", exp)
	h.issue(t, ch(30), "a", 2, "222222", "", exp)
	if r := h.verify(t, "a", "111111", ""); r.Status != events.StatusInvalidCode {
		t.Fatalf("an older code with recent_codes 1: %+v", r)
	}
	if r := h.verify(t, "a", "222222", ""); r.Status != events.StatusVerified {
		t.Fatalf("newest code: %+v", r)
	}

	h.publishIssued(t, issue{ChallengeID: ch(31), RequestID: "qa", CodeSeq: 1, Recipient: "qa@acme.test", ExpiresAt: exp, Test: true}, "000111")
	h.waitProjected(t, ch(31), 1)
	if r := h.verify(t, "qa", "000111", ""); r.Status != events.StatusVerified {
		t.Fatalf("test recipient: %+v", r)
	}
	var v events.Verified
	for _, m := range testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.verified.acme", 2, 10*time.Second) {
		testenv.Must(t, json.Unmarshal(m.Data, &v), "decode")
		if v.RequestID == "qa" && !v.Test {
			t.Fatal("verified event for a test recipient not marked test")
		}
		if v.RequestID == "a" && v.Test {
			t.Fatal("a real challenge marked test")
		}
	}
}

// TestRetentionPurge: cutoffs are on the database clock; a process clock a day ahead
// purges nothing early.
func TestRetentionPurge(t *testing.T) {
	h := newHarness(t)
	now := h.dbNow(t)
	h.clock.set(now.Add(25 * time.Hour))
	h.issue(t, ch(40), "used", 1, "111111", "", now.Add(5*time.Minute))
	h.verify(t, "used", "111111", "")
	h.issue(t, ch(41), "expired", 1, "222222", "", now.Add(-25*time.Hour))
	h.issue(t, ch(42), "live", 1, "333333", "", now.Add(time.Hour))
	h.issue(t, ch(43), "used-recently", 1, "444444", "", now.Add(5*time.Minute))
	h.verify(t, "used-recently", "444444", "")
	testenv.Must(t, func() error {
		_, err := h.pool.Exec(t.Context(), `UPDATE verifier.challenges SET updated_at = now() - interval '25 hours' WHERE request_id = 'used'`)
		return err
	}(), "age the used challenge")
	n, err := h.svc.Purge(t.Context())
	testenv.Must(t, err, "purge")
	var left []string
	rows, _ := h.pool.Query(t.Context(), `SELECT request_id FROM verifier.challenges ORDER BY request_id`)
	for rows.Next() {
		var r string
		_ = rows.Scan(&r)
		left = append(left, r)
	}
	if n < 2 || len(left) != 2 || left[0] != "live" || left[1] != "used-recently" {
		t.Fatalf("purged %d; left %v, want the live and the recently used challenge", n, left)
	}
}

// TestReadYourWritesOnAReplicatedStream: the same guarantee on a three-node cluster with
// R3 streams, the verifier connected to one node and the publisher to another.
func TestReadYourWritesOnAReplicatedStream(t *testing.T) {
	nodes := testenv.Cluster(t, 3)
	_, pubJS := testenv.JetStreamReplicas(t, nodes[1], 3)
	nc, js := testenv.JetStreamReplicas(t, nodes[2], 3)
	pool := testenv.Postgres(t, Spec())
	pepper, err := keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subject key")
	// A generous bound: on a loaded 2-core box an R3 stream can take more than the default
	// second to acknowledge; without the fence the verify below answers not_found at once.
	svc, err := New(Config{Pepper: pepper, Subjects: subjects, FenceWait: 10 * time.Second, Streams: events.StreamOptions{Replicas: 3}, DLQKey: testenv.DLQKey(t)}, pool, nc, js, testenv.Logger(io.Discard), nil)
	testenv.Must(t, err, "verifier")
	svc.beforeProject = func() { time.Sleep(300 * time.Millisecond) }
	testenv.Start(t, svc.Run)
	testenv.Eventually(t, 30*time.Second, "the verify service", func() bool {
		_, err := nc.Request("$SRV.PING.otp-verifier", nil, time.Second)
		return err == nil
	})
	h := &harness{nc: nc, js: pubJS, pool: pool, pepper: pepper, issuerRing: subjects, svc: svc}
	for i := range 3 {
		h.publishIssued(t, issue{ChallengeID: ch(50 + i), RequestID: fmt.Sprintf("r3-%d", i), CodeSeq: 1,
			Recipient: fmt.Sprintf("r3-%d@example.com", i), ExpiresAt: time.Now().Add(time.Minute)}, "246802")
		if r := h.verify(t, fmt.Sprintf("r3-%d", i), "246802", ""); r.Status != events.StatusVerified {
			t.Fatalf("verify right after issue on R3: %+v, want verified", r)
		}
	}
	info, err := pubJS.Stream(t.Context(), events.StreamChallenges)
	testenv.Must(t, err, "stream")
	if si, _ := info.Info(t.Context()); si.Config.Replicas != 3 || si.Config.AllowDirect {
		t.Fatalf("stream config %+v: want R3 without direct gets", si.Config)
	}
}

// TestTestRecipientsCannotBeBruteForced: a test recipient's code is fixed, so cycling
// request ids (a fresh challenge, fresh attempts, each time) would guess it unless test
// challenges count toward the per-recipient failure cap like every address. The cap keys
// on the canonical address, so changing its case does not make a new recipient.
func TestTestRecipientsCannotBeBruteForced(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_failures_per_hour: 6}
    risk: {recipient_failures: {failures: 3, window: 1h, max_attempts: 2}}
`, nil)
	const fixed = "000111"
	addresses := []string{"qa@acme.test", "QA@acme.test", "Qa@Acme.Test"}
	exp := time.Now().Add(5 * time.Minute)
	issueTest := func(i int) string {
		t.Helper()
		id := fmt.Sprintf("qa-%d", i)
		h.publishIssued(t, issue{ChallengeID: ch(70 + i), RequestID: id, CodeSeq: 1, Recipient: addresses[i%len(addresses)],
			ExpiresAt: exp, Test: true}, fixed)
		h.waitProjected(t, ch(70+i), 1)
		return id
	}
	for i := range 6 {
		r := h.verify(t, issueTest(i), "123456", "")
		// The risk rule applies too: after 3 failures a new test challenge gets 2 attempts.
		want := 4
		if i >= 3 {
			want = 1
		}
		if r.Status != events.StatusInvalidCode || r.AttemptsRemaining != want {
			t.Fatalf("wrong guess %d: %+v, want invalid_code with %d attempts left", i, r, want)
		}
	}
	r := h.verify(t, issueTest(6), fixed, "")
	if r.Status != events.StatusLocked || r.Reason != "recipient_failures" {
		t.Fatalf("the right fixed code after the cap: %+v, want locked (recipient_failures)", r)
	}
	var keys []string
	rows, err := h.pool.Query(t.Context(), `SELECT DISTINCT array_to_string(recipient_keys, ',') FROM verifier.challenges`)
	testenv.Must(t, err, "recipient keys")
	keys, err = pgx.CollectRows(rows, pgx.RowTo[string])
	testenv.Must(t, err, "recipient keys")
	if want := h.subjects.Subject("acme", events.CanonicalAddress(addresses[1])); len(keys) != 1 || keys[0] != want {
		t.Fatalf("recipient keys %q, want the one hash of the canonical address %q", keys, want)
	}

	// The attempt limit holds for a single test challenge too.
	h2 := newPolicyHarness(t, "", nil)
	h2.publishIssued(t, issue{ChallengeID: ch(80), RequestID: "qa", CodeSeq: 1, Recipient: "qa@acme.test", ExpiresAt: exp, Test: true}, fixed)
	h2.waitProjected(t, ch(80), 1)
	for range 5 {
		h2.verify(t, "qa", "123456", "")
	}
	if r := h2.verify(t, "qa", fixed, ""); r.Status != events.StatusLocked {
		t.Fatalf("the fixed code after 5 wrong guesses: %+v, want locked", r)
	}
}
