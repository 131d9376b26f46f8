package verifier

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

// groupHarness is a verifier with one verify transaction at a time, and a way to hold it
// so that the verifies made meanwhile queue, in the order made, and then commit as one
// group.
type groupHarness struct {
	*harness
	t       *testing.T
	release func()
}

func newGroupHarness(t *testing.T, doc string, tune func(*Config)) *groupHarness {
	h := newConfigHarness(t, doc, nil, func(c *Config) {
		c.VerifyTransactions = 1
		// The outbox relay stays out of it: events a group decides reach the stream by
		// the group's own publish, or not at all.
		c.relayAge = time.Hour
		// Only the test of a held row waits the lock timeout out.
		c.lockTimeout = time.Minute
		if tune != nil {
			tune(c)
		}
	})
	h.publishIssued(t, issue{ChallengeID: ch(999), RequestID: "blocker", CodeSeq: 1, Recipient: "blocker@example.com",
		ExpiresAt: time.Now().Add(time.Hour)}, "999999")
	h.waitProjected(t, ch(999), 1)
	return &groupHarness{harness: h, t: t}
}

// groups reads the group-size histogram: groups run and verifies in them.
func (g *groupHarness) groups() (count uint64, verifies float64) {
	var m dto.Metric
	testenv.Must(g.t, g.svc.groups.size.Write(&m), "group sizes")
	return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
}

// hold takes the one verify transaction: a test transaction locks the blocker
// challenge's row and a verify of it starts, and waits for the lock.
func (g *groupHarness) hold() {
	t := g.t
	tx, err := g.pool.Begin(t.Context())
	testenv.Must(t, err, "begin")
	_, err = tx.Exec(t.Context(), `SELECT 1 FROM verifier.challenges WHERE request_id = 'blocker' FOR UPDATE`)
	testenv.Must(t, err, "lock the blocker")
	before, _ := g.groups()
	done := make(chan events.VerifyReply, 1)
	go func() { done <- g.verify(t, "blocker", "999999", "") }()
	testenv.Eventually(t, 10*time.Second, "the blocker's group running", func() bool {
		n, _ := g.groups()
		return n == before+1
	})
	g.release = func() {
		testenv.Must(t, tx.Rollback(context.Background()), "release the blocker")
		if r := <-done; r.Status != events.StatusVerified {
			t.Errorf("blocker: %+v", r)
		}
	}
}

// queue makes a verify call that waits for the group held and returns where its reply
// will come.
func (g *groupHarness) queue(requestID, code, ip string) <-chan events.VerifyReply {
	t := g.t
	before := g.svc.groups.queued()
	out := make(chan events.VerifyReply, 1)
	go func() {
		body, _ := json.Marshal(events.VerifyRequest{RequestID: requestID, Code: code, Context: events.VerifyContext{IP: ip}})
		msg, err := g.nc.Request("otp.verify.acme", body, 30*time.Second)
		var r events.VerifyReply
		switch {
		case err == nil && msg.Header.Get("Nats-Service-Error-Code") != "":
			r.Status = statusServiceError
		case err == nil:
			err = json.Unmarshal(msg.Data, &r)
		}
		if err != nil {
			t.Errorf("verify %s: %v", requestID, err)
		}
		out <- r
	}()
	testenv.Eventually(t, 10*time.Second, "the call queued", func() bool { return g.svc.groups.queued() == before+1 })
	return out
}

// statusServiceError stands for a micro error reply (an internal error; retry) in a test.
const statusServiceError events.VerifyStatus = "service_error"

// want is a verify call and what it must be answered.
type want struct {
	requestID, code string
	status          events.VerifyStatus
	remaining       int
}

// runGroup holds the transaction, queues calls in order, releases, and checks that
// they were committed together, as one group, and each answered as wanted.
func (g *groupHarness) runGroup(ip string, calls []want) {
	t := g.t
	g.hold()
	replies := make([]<-chan events.VerifyReply, len(calls))
	for i, c := range calls {
		replies[i] = g.queue(c.requestID, c.code, ip)
	}
	before, verifies := g.groups()
	g.release()
	for i, c := range calls {
		r := <-replies[i]
		if r.Status != c.status || (c.status == events.StatusInvalidCode && r.AttemptsRemaining != c.remaining) {
			t.Errorf("call %d (%s %s): %+v, want %s with %d remaining", i, c.requestID, c.code, r, c.status, c.remaining)
		}
	}
	after, verifiesAfter := g.groups()
	if after != before+1 || verifiesAfter-verifies != float64(len(calls)) {
		t.Fatalf("%d groups with %v verifies after the blocker's, want 1 group of %d", after-before, verifiesAfter-verifies, len(calls))
	}
}

// issueTwo projects two challenges of two people: ch(1) for request a with code 111111
// and ch(2) for request b with code 222222.
func (g *groupHarness) issueTwo(a, b string) {
	exp := time.Now().Add(time.Hour)
	g.publishIssued(g.t, issue{ChallengeID: ch(1), RequestID: a, CodeSeq: 1, Recipient: "one@example.com", ExpiresAt: exp}, "111111")
	g.publishIssued(g.t, issue{ChallengeID: ch(2), RequestID: b, CodeSeq: 1, Recipient: "two@example.com", ExpiresAt: exp}, "222222")
	g.waitProjected(g.t, ch(1), 1)
	g.waitProjected(g.t, ch(2), 1)
}

// refuse makes the database raise an exception for writes to requestID's challenge row:
// at the write, or, with atCommit, at the commit (a deferred constraint trigger).
func (g *groupHarness) refuse(requestID string, atCommit bool) {
	trigger := `CREATE TRIGGER test_refuse BEFORE UPDATE ON verifier.challenges`
	if atCommit {
		trigger = `CREATE CONSTRAINT TRIGGER test_refuse AFTER UPDATE ON verifier.challenges DEFERRABLE INITIALLY DEFERRED`
	}
	_, err := testenv.Admin(g.t, g.pool).Exec(g.t.Context(), `
		CREATE FUNCTION verifier.test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.request_id = '`+requestID+`' THEN RAISE EXCEPTION 'a refused row'; END IF;
			RETURN NEW;
		END $$;
		`+trigger+` FOR EACH ROW EXECUTE FUNCTION verifier.test_refuse()`)
	testenv.Must(g.t, err, "refuse %s", requestID)
}

func (g *groupHarness) state(challenge string) (int, string) {
	var attempts int
	var status string
	testenv.Must(g.t, g.pool.QueryRow(context.Background(), `SELECT attempts, status FROM verifier.challenges WHERE challenge_id = $1`,
		challenge).Scan(&attempts, &status), "read %s", challenge)
	return attempts, status
}

// TestAGroupCountsAttemptsExactly: the attack of TestConcurrentWrongGuessesCountExactly
// with every guess in one transaction. Guesses at one challenge in one group count like
// guesses in a row: each sees the attempts the ones before it used, a code verifies at
// most once, a challenge locks once, and the right code after the lock is refused.
func TestAGroupCountsAttemptsExactly(t *testing.T) {
	g := newGroupHarness(t, "", nil)
	g.issueTwo("r1", "r2")

	g.runGroup("", []want{
		{"r1", "000000", events.StatusInvalidCode, 4},
		{"r2", "000000", events.StatusInvalidCode, 4},
		{"r1", "000001", events.StatusInvalidCode, 3},
		{"r1", "111111", events.StatusVerified, 0},
		{"r1", "111111", events.StatusAlreadyUsed, 0}, // a replay in the same transaction
		{"r2", "000002", events.StatusInvalidCode, 3},
		{"r2", "000003", events.StatusInvalidCode, 2},
		{"r2", "000004", events.StatusInvalidCode, 1},
		{"r2", "000005", events.StatusInvalidCode, 0},
		{"r2", "222222", events.StatusLocked, 0}, // the right code, one past the limit
	})
	if a, s := g.state(ch(1)); a != 3 || s != statusVerified {
		t.Errorf("r1: %d attempts, %s; want 3, verified", a, s)
	}
	if a, s := g.state(ch(2)); a != 5 || s != statusLocked {
		t.Errorf("r2: %d attempts, %s; want 5, locked", a, s)
	}
	testenv.WaitMessages(t, g.js, events.StreamEvents, "otp.locked.acme", 1, 10*time.Second)
	testenv.WaitMessages(t, g.js, events.StreamEvents, "otp.verified.acme", 2, 10*time.Second) // r1 and the blocker
	if n := len(testenv.Messages(t, g.js, events.StreamEvents, "otp.locked.acme")); n != 1 {
		t.Errorf("%d otp.locked, want 1", n)
	}
	if n := len(testenv.Messages(t, g.js, events.StreamEvents, "otp.verified.acme")); n != 2 {
		t.Errorf("%d otp.verified, want 2", n)
	}
	testenv.WaitMessages(t, g.js, events.StreamEvents, "otp.verify_failed.acme", 9, 10*time.Second)
	testenv.Eventually(t, 10*time.Second, "the outbox emptied by the group's publish", func() bool {
		var n int
		_ = g.pool.QueryRow(t.Context(), `SELECT count(*) FROM verifier.outbox`).Scan(&n)
		return n == 0
	})
}

// TestAGroupKeepsTheRecipientFailureCap: guesses spread over two challenges of one
// person in one group add up against the person's cap, as they do in a row.
func TestAGroupKeepsTheRecipientFailureCap(t *testing.T) {
	g := newGroupHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_failures_per_hour: 3}
    risk: {recipient_failures: {failures: 0}}
`, nil)
	exp := time.Now().Add(time.Hour)
	g.publishIssued(t, issue{ChallengeID: ch(1), RequestID: "a", CodeSeq: 1, Recipient: "ana@example.com", ExpiresAt: exp}, "111111")
	g.publishIssued(t, issue{ChallengeID: ch(2), RequestID: "b", CodeSeq: 1, Recipient: "ana@example.com", ExpiresAt: exp}, "222222")
	g.publishIssued(t, issue{ChallengeID: ch(3), RequestID: "c", CodeSeq: 1, Recipient: "bo@example.com", ExpiresAt: exp}, "333333")
	for i := 1; i <= 3; i++ {
		g.waitProjected(t, ch(i), 1)
	}
	g.runGroup("", []want{
		{"a", "000000", events.StatusInvalidCode, 4},
		{"b", "000000", events.StatusInvalidCode, 4},
		{"c", "000000", events.StatusInvalidCode, 4}, // another person
		{"a", "000001", events.StatusInvalidCode, 3},
		{"b", "222222", events.StatusLocked, 0}, // three failures for ana before it
		{"c", "333333", events.StatusVerified, 0},
	})
	var stamps int
	testenv.Must(t, g.pool.QueryRow(t.Context(), `SELECT max(cardinality(stamps)) FROM verifier.recipient_failures`).Scan(&stamps), "stamps")
	if stamps != 3 {
		t.Errorf("the fullest failure row holds %d stamps, want ana's 3", stamps)
	}
}

// TestAGroupCountsVerifyLimitsInOrder: an IP's calls in one group are counted one after
// the other: those within the limit go on, the rest are refused without costing an
// attempt.
func TestAGroupCountsVerifyLimitsInOrder(t *testing.T) {
	g := newGroupHarness(t, "", func(c *Config) { c.VerifyIPPerMinute = 3 })
	g.publishIssued(t, issue{ChallengeID: ch(1), RequestID: "r1", CodeSeq: 1, Recipient: "one@example.com",
		ExpiresAt: time.Now().Add(time.Hour)}, "111111")
	g.waitProjected(t, ch(1), 1)
	g.runGroup("203.0.113.7", []want{
		{"r1", "000000", events.StatusInvalidCode, 4},
		{"r1", "000001", events.StatusInvalidCode, 3},
		{"r1", "000002", events.StatusInvalidCode, 2},
		{"r1", "111111", events.StatusRateLimited, 0},
		{"r1", "111111", events.StatusRateLimited, 0},
	})
	if a, s := g.state(ch(1)); a != 3 || s != statusActive {
		t.Errorf("r1: %d attempts, %s; want 3, active", a, s)
	}
}

// TestADeadlockedGroupIsRunAgain: another transaction takes a group's challenge rows
// crosswise, PostgreSQL aborts the group's transaction as the deadlock, and the group is
// run again and answers every call.
func TestADeadlockedGroupIsRunAgain(t *testing.T) {
	g := newGroupHarness(t, "", nil)
	g.issueTwo("ra", "rb")
	admin := testenv.Admin(t, g.pool)

	g.hold()
	ra, rb := g.queue("ra", "111111", ""), g.queue("rb", "222222", "")
	// The other transaction holds rb; it will wait for ra, which the group locks first.
	// Its own deadlock check comes late, so the group's finds the cycle.
	other, err := admin.BeginTx(t.Context(), pgx.TxOptions{})
	testenv.Must(t, err, "begin")
	defer other.Rollback(context.Background())
	_, err = other.Exec(t.Context(), `SET LOCAL deadlock_timeout = '60s'`)
	testenv.Must(t, err, "deadlock_timeout")
	_, err = other.Exec(t.Context(), `SELECT 1 FROM verifier.challenges WHERE request_id = 'rb' FOR UPDATE`)
	testenv.Must(t, err, "lock rb")
	g.release()
	testenv.Eventually(t, 10*time.Second, "the group waiting for rb", func() bool {
		var n int
		_ = admin.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%FROM verifier.challenges c WHERE tenant%'`).Scan(&n)
		return n == 1
	})
	_, err = other.Exec(t.Context(), `SELECT 1 FROM verifier.challenges WHERE request_id = 'ra' FOR UPDATE`)
	testenv.Must(t, err, "lock ra after the group's transaction was aborted")
	testenv.Must(t, other.Commit(t.Context()), "commit")
	for name, r := range map[string]<-chan events.VerifyReply{"ra": ra, "rb": rb} {
		if got := <-r; got.Status != events.StatusVerified {
			t.Errorf("%s: %+v, want verified", name, got)
		}
	}
	if n := testutil.ToFloat64(g.svc.store.groupRetries); n != 1 {
		t.Errorf("%v group retries, want 1", n)
	}
}

// TestARowHeldElsewhereDoesNotStallItsGroup: another transaction holds one challenge's
// row. The group it is in gives up on the lock after groupLockTimeout, and its calls run
// one by one: the others are answered, the held one fails (and is answered when its
// caller retries), and nothing is counted twice.
func TestARowHeldElsewhereDoesNotStallItsGroup(t *testing.T) {
	g := newGroupHarness(t, "", func(c *Config) { c.lockTimeout = 2 * time.Second })
	g.issueTwo("held", "free")
	other, err := testenv.Admin(t, g.pool).Begin(t.Context())
	testenv.Must(t, err, "begin")
	defer other.Rollback(context.Background())
	_, err = other.Exec(t.Context(), `SELECT 1 FROM verifier.challenges WHERE request_id = 'held' FOR UPDATE`)
	testenv.Must(t, err, "hold the row")

	g.hold()
	held, free := g.queue("held", "111111", ""), g.queue("free", "000000", "")
	g.release()
	if r := <-free; r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 4 {
		t.Errorf("free: %+v, want invalid_code with 4 remaining", r)
	}
	if r := <-held; r.Status != statusServiceError {
		t.Errorf("held: %+v, want an internal error to retry", r)
	}
	testenv.Must(t, other.Rollback(t.Context()), "let go")
	if r := g.verify(t, "held", "111111", ""); r.Status != events.StatusVerified {
		t.Errorf("held, retried: %+v", r)
	}
	if a, _ := g.state(ch(1)); a != 1 {
		t.Errorf("held: %d attempts, want 1", a)
	}
	if a, _ := g.state(ch(2)); a != 1 {
		t.Errorf("free: %d attempts, want 1 (counted once, not again when its group was split)", a)
	}
}

// TestAGroupARowRefusesIsSplit: the database refuses one call's write (a trigger stands
// for any refusal); the group is rolled back and its calls run one by one, so only that
// call fails.
func TestAGroupARowRefusesIsSplit(t *testing.T) {
	g := newGroupHarness(t, "", nil)
	g.issueTwo("stubborn", "fine")
	g.refuse("stubborn", false)
	g.runGroupSplit([]want{
		{"stubborn", "111111", statusServiceError, 0},
		{"fine", "222222", events.StatusVerified, 0},
	})
	if a, s := g.state(ch(2)); a != 1 || s != statusVerified {
		t.Errorf("fine: %d attempts, %s", a, s)
	}
	if a, s := g.state(ch(1)); a != 0 || s != statusActive {
		t.Errorf("stubborn: %d attempts, %s; want it untouched", a, s)
	}
}

// runGroupSplit is runGroup for a group that is split: one group, then its calls alone.
func (g *groupHarness) runGroupSplit(calls []want) {
	t := g.t
	g.hold()
	replies := make([]<-chan events.VerifyReply, len(calls))
	for i, c := range calls {
		replies[i] = g.queue(c.requestID, c.code, "")
	}
	g.release()
	for i, c := range calls {
		if r := <-replies[i]; r.Status != c.status {
			t.Errorf("call %d (%s): %+v, want %s", i, c.requestID, r, c.status)
		}
	}
}

// TestACallGivenUpWhileQueuedCostsNothing: a caller that gives up while its call waits for
// a group gets its context's error, and its guess is not counted.
func TestACallGivenUpWhileQueuedCostsNothing(t *testing.T) {
	g := newGroupHarness(t, "", nil)
	g.publishIssued(t, issue{ChallengeID: ch(1), RequestID: "r1", CodeSeq: 1, Recipient: "one@example.com",
		ExpiresAt: time.Now().Add(time.Hour)}, "111111")
	g.waitProjected(t, ch(1), 1)
	g.hold()
	ctx, cancel := context.WithCancel(t.Context())
	errs := make(chan error, 1)
	go func() {
		_, err := g.svc.Verify(ctx, "acme", events.VerifyRequest{RequestID: "r1", Code: "000000"})
		errs <- err
	}()
	testenv.Eventually(t, 10*time.Second, "the call queued", func() bool { return g.svc.groups.queued() == 1 })
	cancel()
	g.release()
	if err := <-errs; !errors.Is(err, context.Canceled) {
		t.Errorf("err %v, want context.Canceled", err)
	}
	if a, _ := g.state(ch(1)); a != 0 {
		t.Errorf("%d attempts, want 0", a)
	}
}

// TestAPurgedFailureRowIsStillCounted: a purge deletes a recipient's stale failure row
// while a verify waits for it. The verify still records its failure, under a row it
// holds, so the cap keeps counting from the first guess of an attack.
func TestAPurgedFailureRowIsStillCounted(t *testing.T) {
	h := newPolicyHarness(t, `
tenants:
  acme:
    rate_limits: {recipient_failures_per_hour: 3}
    risk: {recipient_failures: {failures: 0}}
`, nil)
	h.publishIssued(t, issue{ChallengeID: ch(1), RequestID: "p1", CodeSeq: 1, Recipient: "ana@example.com", ExpiresAt: time.Now().Add(time.Hour)}, "111111")
	h.waitProjected(t, ch(1), 1)
	var keys []string
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT recipient_keys FROM verifier.challenges WHERE request_id = 'p1'`).Scan(&keys), "keys")
	_, err := h.pool.Exec(t.Context(), `INSERT INTO verifier.recipient_failures (tenant, recipient_key, stamps)
		SELECT 'acme', k, ARRAY[now() - interval '2 hours'] FROM unnest($1::text[]) k`, keys)
	testenv.Must(t, err, "a stale failure row")
	admin := testenv.Admin(t, h.pool)
	purge, err := admin.Begin(t.Context())
	testenv.Must(t, err, "begin")
	defer purge.Rollback(context.Background())
	_, err = purge.Exec(t.Context(), `SELECT 1 FROM verifier.recipient_failures
		WHERE coalesce(stamps[array_upper(stamps, 1)], '-infinity') < now() - interval '1 hour' FOR UPDATE SKIP LOCKED`)
	testenv.Must(t, err, "the purge's lock")
	done := make(chan events.VerifyReply, 1)
	go func() { done <- h.verify(t, "p1", "000000", "") }()
	testenv.Eventually(t, 10*time.Second, "the verify waiting for the failure row", func() bool {
		var n int
		_ = admin.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%verifier.recipient_failures%'`).Scan(&n)
		return n == 1
	})
	_, err = purge.Exec(t.Context(), `DELETE FROM verifier.recipient_failures`)
	testenv.Must(t, err, "the purge's delete")
	testenv.Must(t, purge.Commit(t.Context()), "commit")
	if r := <-done; r.Status != events.StatusInvalidCode {
		t.Fatalf("guess: %+v", r)
	}
	var stamps int
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT coalesce(max(cardinality(stamps)), 0) FROM verifier.recipient_failures`).Scan(&stamps), "stamps")
	if stamps != 1 {
		t.Errorf("the failure row holds %d stamps after the guess, want 1", stamps)
	}
}

// TestAGroupWhoseCommitFailsIsNotRunAgain: the database refuses a group at its COMMIT (a
// deferred constraint trigger stands for any failure there, a lost connection among
// them, where the outcome may be unknown). The calls are answered with an internal error
// to retry, and none is run again on its own: a commit that did land would count it twice.
func TestAGroupWhoseCommitFailsIsNotRunAgain(t *testing.T) {
	g := newGroupHarness(t, "", nil)
	g.issueTwo("atcommit", "fine")
	g.refuse("atcommit", true)
	g.runGroupSplit([]want{
		{"atcommit", "000000", statusServiceError, 0},
		{"fine", "222222", statusServiceError, 0},
	})
	if a, s := g.state(ch(2)); a != 0 || s != statusActive {
		t.Errorf("fine: %d attempts, %s; want it untouched (not run again alone)", a, s)
	}
}
