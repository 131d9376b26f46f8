package verifier

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/window"
)

// Statuses of a projected challenge. Only an active challenge can still be verified.
const (
	statusActive     = "active"
	statusVerified   = "verified"
	statusLocked     = "locked"
	statusSuperseded = "superseded"
)

// store holds the verifier's SQL: the projection of issued challenges and their codes,
// the attempt counters and failure stamps a verify takes row locks on, the verify limits,
// and the outbox the verify events leave through.
type store struct {
	pool   *pgxpool.Pool
	outbox *outbox.Outbox
}

// challenge is a projected challenge as a verify finds it, its row locked.
type challenge struct {
	id, status, sessionID string
	// recipientKeys are the recipient's subject hashes, one per key of the ring when the
	// challenge was projected, so the failure cap holds across a key rotation.
	recipientKeys         []string
	attempts, maxAttempts int
	test                  bool
	// traceParent is that of the newest code's otp.challenge: the issuance's span.
	traceParent string
	// failures are the recipient's failed verifications across challenges, oldest
	// first, their rows locked too: read only for an active challenge with recipient keys.
	failures window.Stamps
}

// code is one stored code of a challenge.
type code struct {
	seq     int
	mac     []byte
	keyID   string
	expires time.Time
}

// decision is what a verify rule decided, written by the store in the verify's
// transaction.
type decision struct {
	reply events.VerifyReply // for the caller; the store does not read it
	// status, when set, is the challenge's new status, written with attempts.
	status   string
	attempts int
	// failures, when set, replace the recipient's failure stamps.
	failures window.Stamps
	// events go to the outbox in the same transaction.
	events []*nats.Msg
}

// verifyRule decides one verify. now is the database clock, read once the challenge's row
// lock was taken: a verify that waited for the lock is judged at the time it runs. c is
// nil when no challenge is projected for the request. recent reads the challenge's n
// newest codes, newest first, in the same transaction.
type verifyRule func(now time.Time, c *challenge, recent func(n int) ([]code, error)) (decision, error)

// verify runs rule for the challenge of (tenant, requestID) in one transaction that holds
// the challenge's row lock, so concurrent attempts are counted exactly, and writes what it
// decided: the challenge's attempts and status, the recipient's failure stamps and the
// events, whose outbox entries it returns for publishing after the commit. A request
// with no projected challenge fails with errNotProjected, unless answerMissing: then rule
// runs with a nil challenge.
func (st *store) verify(ctx context.Context, tenant, requestID string, answerMissing bool, rule verifyRule) ([]outbox.Entry, error) {
	var entries []outbox.Entry
	err := pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		c := &challenge{}
		err := tx.QueryRow(ctx, `SELECT challenge_id::text, attempts, max_attempts, status, session_id, recipient_keys, test,
				coalesce((SELECT k.trace_parent FROM verifier.codes k WHERE k.challenge_id = c.challenge_id ORDER BY k.code_seq DESC LIMIT 1), '')
			FROM verifier.challenges c WHERE tenant = $1 AND request_id = $2 FOR UPDATE OF c`, tenant, requestID).
			Scan(&c.id, &c.attempts, &c.maxAttempts, &c.status, &c.sessionID, &c.recipientKeys, &c.test, &c.traceParent)
		switch {
		case errors.Is(err, pgx.ErrNoRows) && !answerMissing:
			return errNotProjected
		case errors.Is(err, pgx.ErrNoRows):
			c = nil
		case err != nil:
			return err
		}
		var now time.Time
		if err := tx.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&now); err != nil {
			return err
		}
		now = now.UTC()
		if c != nil && c.status == statusActive && len(c.recipientKeys) > 0 {
			if c.failures, err = lockFailures(ctx, tx, tenant, c.recipientKeys); err != nil {
				return err
			}
		}
		d, err := rule(now, c, func(n int) ([]code, error) { return recentCodes(ctx, tx, c.id, n) })
		if err != nil {
			return err
		}
		if c != nil && d.status != "" {
			if _, err := tx.Exec(ctx, `UPDATE verifier.challenges SET attempts = $2, status = $3, updated_at = now()
				WHERE challenge_id = $1`, c.id, d.attempts, d.status); err != nil {
				return err
			}
		}
		if c != nil && len(c.recipientKeys) > 0 && d.failures != nil {
			// The whole state under every hash: a verifier that knows only some of the
			// keys still reads all of it.
			if _, err := tx.Exec(ctx, `UPDATE verifier.recipient_failures SET stamps = $3 WHERE tenant = $1 AND recipient_key = ANY($2)`,
				tenant, c.recipientKeys, []time.Time(d.failures)); err != nil {
				return err
			}
		}
		entries, err = st.outbox.Add(ctx, tx, d.events...)
		return err
	})
	if err != nil {
		return nil, err
	}
	return entries, nil
}

// lockFailures returns the failure stamps of a recipient, read under each of its hashes
// and merged, creating its rows if needed, and holds their locks (in key order): verifies
// for one recipient are serialised, so the failure cap is exact, also across a rotation.
func lockFailures(ctx context.Context, tx pgx.Tx, tenant string, recipientKeys []string) (window.Stamps, error) {
	ks := slices.Sorted(slices.Values(recipientKeys))
	if _, err := tx.Exec(ctx, `INSERT INTO verifier.recipient_failures (tenant, recipient_key)
		SELECT $1, k FROM unnest($2::text[]) AS k ORDER BY k ON CONFLICT DO NOTHING`, tenant, ks); err != nil {
		return nil, err
	}
	rows, err := tx.Query(ctx, `SELECT stamps FROM verifier.recipient_failures WHERE tenant = $1 AND recipient_key = ANY($2)
		ORDER BY recipient_key FOR UPDATE`, tenant, ks)
	if err != nil {
		return nil, err
	}
	all, err := pgx.CollectRows(rows, pgx.RowTo[[]time.Time])
	if err != nil {
		return nil, err
	}
	// A recipient is known here only by its subject hashes (OTP_SUBJECT_KEY), one per key
	// of the ring when its challenge was projected; the cap decides on the merge of the
	// rows under every hash and writes the whole state back under each, so it holds across
	// a key rotation, also while verifiers with the old and the new ring run side by side.
	var merged window.Stamps
	for _, stamps := range all {
		merged = window.Merge(merged, stamps)
	}
	return merged, nil
}

// recentCodes returns the n newest codes of a challenge, newest first.
func recentCodes(ctx context.Context, tx pgx.Tx, challengeID string, n int) ([]code, error) {
	rows, err := tx.Query(ctx, `SELECT code_seq, code_hmac, pepper_key_id, expires_at FROM verifier.codes
		WHERE challenge_id = $1 ORDER BY code_seq DESC LIMIT $2`, challengeID, n)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (code, error) {
		var c code
		return c, r.Scan(&c.seq, &c.mac, &c.keyID, &c.expires)
	})
}

// project writes a batch of checked events in one transaction. A code whose challenge id
// the projection holds for another request writes nothing and gets its refused set; the
// rest of the batch is written.
//
// A supersession is written whatever the order it arrives in: for a challenge not yet
// projected it writes the challenge as superseded, and the challenge's codes, projected
// later, join it closed. So no order of delivery, redelivery or relay lets a superseded
// code verify.
func (st *store) project(ctx context.Context, items []*projection) error {
	b := &pgx.Batch{}
	// First, before any row lock, a shared lock on the recipient hashes of every code: an
	// erasure takes them exclusively, so it comes wholly before this batch (which then
	// drops the person's codes) or after (and deletes what the batch wrote).
	var lt, lh []string
	for _, p := range items {
		if p.challenge != nil {
			for _, h := range p.challenge.RecipientHashes {
				lt, lh = append(lt, p.tenant), append(lh, h)
			}
		}
	}
	if len(lh) > 0 {
		platform.QueueErasureLocksShared(b, Schema, lt, lh)
	}
	for _, p := range items {
		p.refused, p.erased = nil, false
		switch {
		case p.challenge != nil:
			queueChallenge(b, p)
		case p.superseded != nil:
			// Scoped to the subject's tenant and the request: an event can only close a
			// challenge it names exactly. A challenge id or request id that another
			// challenge holds conflicts, and nothing is written.
			e := p.superseded
			b.Queue(`INSERT INTO verifier.challenges (tenant, request_id, challenge_id, max_attempts, status)
				VALUES ($2, $3, $1, 0, 'superseded') ON CONFLICT DO NOTHING`, e.ChallengeID, p.tenant, e.RequestID)
			b.Queue(`UPDATE verifier.challenges SET status = 'superseded', updated_at = now()
				WHERE challenge_id = $1 AND tenant = $2 AND request_id = $3 AND status = 'active'`,
				e.ChallengeID, p.tenant, e.RequestID)
		}
	}
	if b.Len() == 0 {
		return nil
	}
	return pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error { return tx.SendBatch(ctx, b).Close() })
}

func queueChallenge(b *pgx.Batch, p *projection) {
	tenant, e := p.tenant, p.challenge
	// A code of a person erased after it was issued is dropped (verifier.erasures).
	const erased = `EXISTS (SELECT 1 FROM verifier.erasures x WHERE x.tenant = $1 AND x.recipient_key = ANY ($2::text[]) AND x.erased_at >= $3)`
	hashes := append([]string{}, e.RecipientHashes...)
	b.Queue(`INSERT INTO verifier.challenges (tenant, request_id, challenge_id, max_attempts, session_id, recipient_keys, test, risk)
		SELECT $1, $4, $5, $6, $7, $2, $8, $9 WHERE NOT `+erased+` ON CONFLICT DO NOTHING`, tenant, hashes, e.IssuedAt,
		e.RequestID, e.ChallengeID, e.MaxAttempts, e.SessionID, e.Test, append([]string{}, e.Risk...))
	// A code joins its challenge only if the challenge is this event's own (tenant,
	// request_id, challenge_id); otherwise nothing is written and the event is refused.
	b.Queue(`WITH gone AS (SELECT `+erased+` AS erased),
			c AS (SELECT challenge_id FROM verifier.challenges, gone WHERE NOT gone.erased AND challenge_id = $4 AND tenant = $1 AND request_id = $9),
			ins AS (INSERT INTO verifier.codes (challenge_id, code_seq, code_hmac, pepper_key_id, expires_at, issued_at, trace_parent)
				SELECT challenge_id, $5, $6, $7, $8, $3, $10 FROM c ON CONFLICT DO NOTHING)
		SELECT EXISTS (SELECT 1 FROM c), (SELECT erased FROM gone)`,
		tenant, hashes, e.IssuedAt, e.ChallengeID, e.CodeSeq, e.CodeHMAC, e.PepperKeyID, e.ExpiresAt, e.RequestID, p.traceParent).
		QueryRow(func(row pgx.Row) error {
			var own, gone bool
			if err := row.Scan(&own, &gone); err != nil {
				return err
			}
			switch {
			case gone:
				p.erased = true
			case !own:
				p.refused = errChallengeOwned
			}
			return nil
		})
	// The recipient_failures risk rule, its window measured on the database clock. Each
	// hash's row holds the whole state as its writer saw it: the fullest counts.
	if rf := p.failureRisk; rf.failures > 0 {
		b.Queue(`UPDATE verifier.challenges c SET max_attempts = LEAST(c.max_attempts, $3),
				risk = array_append(c.risk, 'recipient_failures')
			WHERE c.challenge_id = $1 AND c.tenant = $5 AND c.request_id = $6
				AND c.attempts = 0 AND NOT ('recipient_failures' = ANY (c.risk))
				AND (SELECT coalesce(max((SELECT count(*) FROM unnest(f.stamps) AS s(t)
						WHERE s.t > now() - $2::bigint * interval '1 microsecond')), 0)
					FROM verifier.recipient_failures f
					WHERE f.tenant = c.tenant AND f.recipient_key = ANY (c.recipient_keys)) >= $4`,
			e.ChallengeID, rf.window.Microseconds(), rf.maxAttempts, rf.failures, tenant, e.RequestID)
	}
}

// limitCount is one verify limit's count once a call is counted: hits in the current
// fixed window (the call included), prevHits in the window before, and elapsed since the
// current window started, on the database clock.
type limitCount struct {
	key            []byte
	hits, prevHits int
	elapsed        time.Duration
}

// countLimits counts one verify call against each of keys in one statement, so the count
// holds across replicas; fixed windows of a minute start on the database clock.
func (st *store) countLimits(ctx context.Context, keys [][]byte) ([]limitCount, error) {
	rows, err := st.pool.Query(ctx, `INSERT INTO verifier.verify_limits AS l (key, window_start, hits, prev_hits)
		SELECT k, date_trunc('minute', now()), 1, 0 FROM unnest($1::bytea[]) WITH ORDINALITY AS u(k, i) ORDER BY i
		ON CONFLICT (key) DO UPDATE SET
			prev_hits = CASE WHEN l.window_start = EXCLUDED.window_start THEN l.prev_hits
			                 WHEN l.window_start = EXCLUDED.window_start - interval '1 minute' THEN l.hits
			                 ELSE 0 END,
			hits = CASE WHEN l.window_start = EXCLUDED.window_start THEN l.hits + 1 ELSE 1 END,
			window_start = EXCLUDED.window_start
		RETURNING key, hits, prev_hits, extract(epoch FROM now() - window_start)::float8`, keys)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (limitCount, error) {
		var (
			c              limitCount
			elapsedSeconds float64
		)
		err := r.Scan(&c.key, &c.hits, &c.prevHits, &elapsedSeconds)
		c.elapsed = time.Duration(elapsedSeconds * float64(time.Second))
		return c, err
	})
}

// purge deletes challenges whose newest code expired, or that were used, locked or
// superseded, more than retention ago, with their codes; failure stamps older than an
// hour; and verify-limit windows that no longer count. Every cutoff is on the database
// clock.
func (st *store) purge(ctx context.Context, retention time.Duration) (int64, error) {
	var total int64
	err := pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT c.challenge_id FROM verifier.challenges c
			WHERE (c.status <> 'active' AND c.updated_at < now() - $1::bigint * interval '1 microsecond')
			   OR (NOT EXISTS (SELECT 1 FROM verifier.codes k WHERE k.challenge_id = c.challenge_id
			                   AND k.expires_at >= now() - $1::bigint * interval '1 microsecond')
			       -- a supersession projected before its challenge's codes waits for them
			       AND EXISTS (SELECT 1 FROM verifier.codes k WHERE k.challenge_id = c.challenge_id))
			FOR UPDATE SKIP LOCKED`, retention.Microseconds())
		if err != nil {
			return err
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil || len(ids) == 0 {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM verifier.codes WHERE challenge_id = ANY($1::uuid[])`, ids); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `DELETE FROM verifier.challenges WHERE challenge_id = ANY($1::uuid[])`, ids)
		total = tag.RowsAffected()
		return err
	})
	if err != nil {
		return total, err
	}
	tag, err := st.pool.Exec(ctx, `DELETE FROM verifier.recipient_failures
		WHERE coalesce(stamps[array_upper(stamps, 1)], '-infinity') < now() - interval '1 hour'`)
	if err != nil {
		return total, err
	}
	total += tag.RowsAffected()
	tag, err = st.pool.Exec(ctx, `DELETE FROM verifier.verify_limits WHERE window_start < now() - interval '2 minutes'`)
	if err != nil {
		return total, err
	}
	total += tag.RowsAffected()
	tag, err = st.pool.Exec(ctx, `DELETE FROM verifier.erasures WHERE erased_at < now() - $1::bigint * interval '1 microsecond'`,
		retention.Microseconds())
	return total + tag.RowsAffected(), err
}

// errNotProjected means the challenge is not in the projection (yet).
var errNotProjected = errors.New("challenge not projected")
