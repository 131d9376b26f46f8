package dispatcher

import (
	"context"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestClaimAndCompleteKeepEachKeysRow: claim and complete work on a whole batch in one
// transaction each, with keys in any order; each key gets its own row. The batch
// mixes a new job, a row settled before, a sending row whose lease ran out and one still
// leased, in an order that is not the rows' own; then completions of every kind, one of
// them for a row another worker settled meanwhile.
func TestClaimAndCompleteKeepEachKeysRow(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	fresh, sent, stale, leased := challenge(90), challenge(91), challenge(92), challenge(93)
	_, err := h.pool.Exec(ctx, `INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id, status, attempts,
		expires_at, claimed_at, lease_until, provider, provider_message_id) VALUES
		($1, 2, 'acme', 'r1', 'sent', 3, now() + interval '5 minutes', now(), now(), 'ses', 'm-sent'),
		($2, 1, 'acme', 'r2', 'sending', 2, now() + interval '5 minutes', now(), now() - interval '1 second', '', ''),
		($3, 1, 'acme', 'r3', 'sending', 4, now() + interval '5 minutes', now(), now() + interval '1 minute', '', '')`,
		sent, stale, leased)
	testenv.Must(t, err, "insert rows")
	keys := []deliveryKey{{leased, 1}, {fresh, 1}, {stale, 1}, {sent, 2}} // not in key order
	job := func(k deliveryKey) events.DispatchJob {
		return events.DispatchJob{ChallengeID: k.challenge, CodeSeq: k.seq, Tenant: "acme", RequestID: "r", ExpiresAt: time.Now().Add(5 * time.Minute)}
	}
	var got []deliveryRow
	err = h.svc.store.claim(ctx, keys, time.Minute, func(_, _ time.Time, rows []deliveryRow) []claim {
		got = rows
		return []claim{{job: job(keys[1]), fresh: true}, {job: job(keys[2])}}
	})
	testenv.Must(t, err, "claim")
	want := []struct {
		exists   bool
		status   string
		attempts int
		msg      string
	}{{true, statusSending, 4, ""}, {false, "", 0, ""}, {true, statusSending, 2, ""}, {true, statusSent, 3, "m-sent"}}
	for i, w := range want {
		if r := got[i]; r.exists != w.exists || r.status != w.status || r.attempts != w.attempts || r.providerMsg != w.msg {
			t.Errorf("row %d (%v): %+v, want %+v", i, keys[i], r, w)
		}
	}
	attempts := func(k deliveryKey) (int, string, int, string) {
		var n, ambiguous int
		var status, lastError string
		testenv.Must(t, h.pool.QueryRow(ctx, `SELECT attempts, status, ambiguous, last_error FROM dispatcher.deliveries
			WHERE challenge_id = $1 AND code_seq = $2`, k.challenge, k.seq).Scan(&n, &status, &ambiguous, &lastError), "read %v", k)
		return n, status, ambiguous, lastError
	}
	if n, _, _, _ := attempts(keys[1]); n != 1 {
		t.Errorf("new row: %d attempts, want 1", n)
	}
	if n, _, _, _ := attempts(keys[2]); n != 3 {
		t.Errorf("claimed again: %d attempts, want 3", n)
	}
	if n, _, _, _ := attempts(keys[0]); n != 4 {
		t.Errorf("leased row, not claimed: %d attempts, want 4", n)
	}

	// Another worker settles the stale row before this one completes it.
	_, err = h.pool.Exec(ctx, `UPDATE dispatcher.deliveries SET status = 'failed', last_error = 'theirs' WHERE challenge_id = $1`, stale)
	testenv.Must(t, err, "settle elsewhere")
	settled, err := h.svc.store.complete(ctx, []completion{
		{key: keys[0], ambiguous: true, lastError: "timeout after DATA"},
		{key: keys[2], status: statusSent, provider: "smtp", providerMsg: "ours", confirmed: true},
		{key: keys[1], status: statusSent, provider: "ses", providerMsg: "m-fresh", confirmed: true},
	})
	testenv.Must(t, err, "complete")
	if len(settled) != 3 || settled[0] != nil || settled[2] != nil || settled[1] == nil ||
		settled[1].status != statusFailed || settled[1].lastError != "theirs" || settled[1].attempts != 3 {
		t.Fatalf("settled %+v, want only the second, as the other worker left it", settled)
	}
	if _, status, ambiguous, lastError := attempts(keys[0]); status != statusSending || ambiguous != 1 || lastError != "timeout after DATA" {
		t.Errorf("ambiguous completion: %s, %d ambiguous, %q", status, ambiguous, lastError)
	}
	if _, status, _, lastError := attempts(keys[2]); status != statusFailed || lastError != "theirs" {
		t.Errorf("row settled elsewhere: %s %q, want it kept", status, lastError)
	}
	var status, provider, msg string
	var confirmed bool
	testenv.Must(t, h.pool.QueryRow(ctx, `SELECT status, provider, provider_message_id, confirmed FROM dispatcher.deliveries
		WHERE challenge_id = $1`, fresh).Scan(&status, &provider, &msg, &confirmed), "read the new row")
	if status != statusSent || provider != "ses" || msg != "m-fresh" || !confirmed {
		t.Errorf("new row completed as %s %s %s %v", status, provider, msg, confirmed)
	}
}
