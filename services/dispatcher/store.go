package dispatcher

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/events"
)

// Statuses of a delivery row: its own lifecycle, apart from what one send came to.
const (
	statusSending = "sending"
	statusSent    = "sent"
	statusFailed  = "failed"
	statusExpired = "expired"
)

// store holds the dispatcher's SQL: one delivery row per (challenge, code_seq), claimed
// with a lease before the provider is called and completed after it.
type store struct {
	pool *pgxpool.Pool
}

type deliveryKey struct {
	challenge string
	seq       int
}

func keyOf(dj events.DispatchJob) deliveryKey { return deliveryKey{dj.ChallengeID, dj.CodeSeq} }

// deliveryRow is a delivery row as found when claiming; exists is false for a new job.
type deliveryRow struct {
	exists      bool
	status      string
	attempts    int
	provider    string
	providerMsg string
	leaseUntil  time.Time
	ambiguous   int
	confirmed   bool
	lastError   string
}

// claim is a lease to write: a new row (fresh) or the existing one taken again.
type claim struct {
	job   events.DispatchJob
	fresh bool
}

// claim locks the rows of keys (a missing row reads as not existing) and runs decide with
// them, in order, and with two readings of one instant: the local clock, read first, and
// the database clock, read once the rows are locked (a wait for another dispatcher's locks
// must not make it stale). The claims decide returns are written in the same transaction,
// each with a lease until the database clock plus lease. Each step is one statement for
// the whole batch; rows are locked, and new rows inserted, in key order, as complete locks
// them, so two batches never wait on each other crosswise.
func (st *store) claim(ctx context.Context, keys []deliveryKey, lease time.Duration,
	decide func(local, now time.Time, rows []deliveryRow) []claim) error {
	ids, seqs := keyArrays(keys)
	return pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		rows := make([]deliveryRow, len(keys))
		res, err := tx.Query(ctx, `SELECT u.i, d.status, d.attempts, d.provider, d.provider_message_id, d.lease_until, d.ambiguous, d.confirmed, d.last_error
			FROM unnest($1::uuid[], $2::int[]) WITH ORDINALITY AS u(c, s, i)
			JOIN dispatcher.deliveries d ON d.challenge_id = u.c AND d.code_seq = u.s
			ORDER BY d.challenge_id, d.code_seq FOR UPDATE OF d`, ids, seqs)
		if err != nil {
			return fmt.Errorf("lock deliveries: %w", err)
		}
		for res.Next() {
			var i int
			var r deliveryRow
			if err := res.Scan(&i, &r.status, &r.attempts, &r.provider, &r.providerMsg, &r.leaseUntil, &r.ambiguous, &r.confirmed, &r.lastError); err != nil {
				res.Close()
				return fmt.Errorf("lock deliveries: %w", err)
			}
			if i < 1 || i > len(rows) {
				res.Close()
				return fmt.Errorf("lock deliveries: row %d of %d", i, len(rows))
			}
			r.exists = true
			rows[i-1] = r
		}
		if err := res.Err(); err != nil {
			return fmt.Errorf("lock deliveries: %w", err)
		}
		local := time.Now()
		var now time.Time
		if err := tx.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&now); err != nil {
			return fmt.Errorf("read the database clock: %w", err)
		}
		var fresh, again []events.DispatchJob
		for _, c := range decide(local, now, rows) {
			if c.fresh {
				fresh = append(fresh, c.job)
			} else {
				again = append(again, c.job)
			}
		}
		writes := &pgx.Batch{}
		if len(fresh) > 0 {
			n := len(fresh)
			ids, seqs, tenants, requests, expires := make([]string, n), make([]int32, n), make([]string, n), make([]string, n), make([]time.Time, n)
			for i, dj := range fresh {
				ids[i], seqs[i], tenants[i], requests[i], expires[i] = dj.ChallengeID, int32(dj.CodeSeq), dj.Tenant, dj.RequestID, dj.ExpiresAt
			}
			writes.Queue(`INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id, status, attempts,
					expires_at, claimed_at, lease_until)
				SELECT c, s, t, r, 'sending', 1, e, $6, $7
				FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::timestamptz[]) AS u(c, s, t, r, e)
				ORDER BY c, s`, ids, seqs, tenants, requests, expires, now, now.Add(lease))
		}
		if len(again) > 0 {
			keys := make([]deliveryKey, len(again))
			for i, dj := range again {
				keys[i] = keyOf(dj)
			}
			ids, seqs := keyArrays(keys)
			writes.Queue(`UPDATE dispatcher.deliveries d SET attempts = d.attempts + 1, claimed_at = $3, lease_until = $4
				FROM unnest($1::uuid[], $2::int[]) AS u(c, s) WHERE d.challenge_id = u.c AND d.code_seq = u.s`,
				ids, seqs, now, now.Add(lease))
		}
		if writes.Len() == 0 {
			return nil
		}
		return tx.SendBatch(ctx, writes).Close()
	})
}

// keyArrays are keys as the two arrays the statements unnest.
func keyArrays(keys []deliveryKey) (ids []string, seqs []int32) {
	ids, seqs = make([]string, len(keys)), make([]int32, len(keys))
	for i, k := range keys {
		ids[i], seqs[i] = k.challenge, int32(k.seq)
	}
	return ids, seqs
}

// completion is what a claimed job's row learns from its send.
type completion struct {
	key deliveryKey
	// status, when set, completes the row (sent, failed or expired) and ends its lease.
	status      string
	provider    string
	providerMsg string
	confirmed   bool
	// ambiguous counts a send without a final answer; the lease ends for the re-send.
	ambiguous bool
	lastError string
}

// complete writes completions in one transaction. Each applies only to a row still
// sending: a row another worker settled meanwhile (a job given up on its last delivery
// takes the row over) keeps its outcome, so a job never has two. settled holds, at the
// index of each completion that did not apply, the row as that worker left it; nil when
// every completion applied. The rows are locked in key order, as claim locks them, then
// written by one statement; a batch holds each key once (a process claims a key once at
// a time).
func (st *store) complete(ctx context.Context, cs []completion) (settled []*deliveryRow, err error) {
	if len(cs) == 0 {
		return nil, nil
	}
	n := len(cs)
	keys := make([]deliveryKey, n)
	statuses, providers, msgIDs, lastErrors := make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	confirmed, ambiguous := make([]bool, n), make([]bool, n)
	for i, c := range cs {
		keys[i] = c.key
		// Text from providers is made fit for a text column (no NUL, valid UTF-8): the
		// database must never refuse the record of a mail that went out.
		statuses[i], providers[i], msgIDs[i], lastErrors[i] = c.status, pgText(c.provider), pgText(c.providerMsg), pgText(c.lastError)
		confirmed[i], ambiguous[i] = c.confirmed, c.ambiguous
	}
	ids, seqs := keyArrays(keys)
	err = pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		settled = nil
		applied := make([]bool, n)
		b := &pgx.Batch{}
		b.Queue(`SELECT 1 FROM dispatcher.deliveries d JOIN unnest($1::uuid[], $2::int[]) AS u(c, s)
			ON d.challenge_id = u.c AND d.code_seq = u.s ORDER BY d.challenge_id, d.code_seq FOR UPDATE OF d`, ids, seqs)
		// A completion with a status completes the row and ends its lease; one without
		// records the error (and an ambiguous send) and ends the lease for the re-send.
		b.Queue(`UPDATE dispatcher.deliveries d SET
				status = CASE WHEN u.st <> '' THEN u.st ELSE d.status END,
				provider = CASE WHEN u.st <> '' THEN u.p ELSE d.provider END,
				provider_message_id = CASE WHEN u.st <> '' THEN u.m ELSE d.provider_message_id END,
				confirmed = CASE WHEN u.st <> '' THEN u.conf ELSE d.confirmed END,
				completed_at = CASE WHEN u.st <> '' THEN now() ELSE d.completed_at END,
				ambiguous = d.ambiguous + CASE WHEN u.st = '' AND u.amb THEN 1 ELSE 0 END,
				last_error = u.e,
				lease_until = now()
			FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[], $8::bool[])
				WITH ORDINALITY AS u(c, s, st, p, m, e, conf, amb, i)
			WHERE d.challenge_id = u.c AND d.code_seq = u.s AND d.status = 'sending'
			RETURNING u.i`, ids, seqs, statuses, providers, msgIDs, lastErrors, confirmed, ambiguous).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var i int
				if err := rows.Scan(&i); err != nil {
					return err
				}
				if i < 1 || i > n {
					return fmt.Errorf("complete deliveries: row %d of %d", i, n)
				}
				applied[i-1] = true
			}
			return rows.Err()
		})
		if err := tx.SendBatch(ctx, b).Close(); err != nil {
			return fmt.Errorf("complete deliveries: %w", err)
		}
		var missed []deliveryKey
		var at []int
		for i, ok := range applied {
			if !ok {
				missed, at = append(missed, keys[i]), append(at, i)
			}
		}
		if len(missed) == 0 {
			return nil
		}
		ids, seqs := keyArrays(missed)
		rows, err := tx.Query(ctx, `SELECT u.i, d.status, d.attempts, d.provider, d.provider_message_id, d.confirmed, d.last_error
			FROM unnest($1::uuid[], $2::int[]) WITH ORDINALITY AS u(c, s, i)
			JOIN dispatcher.deliveries d ON d.challenge_id = u.c AND d.code_seq = u.s`, ids, seqs)
		if err != nil {
			return fmt.Errorf("read settled deliveries: %w", err)
		}
		defer rows.Close()
		// A missed row that is gone was purged: nobody will ask for it again, and what
		// this worker learned stands.
		settled = make([]*deliveryRow, n)
		for rows.Next() {
			var i int
			r := deliveryRow{exists: true}
			if err := rows.Scan(&i, &r.status, &r.attempts, &r.provider, &r.providerMsg, &r.confirmed, &r.lastError); err != nil {
				return fmt.Errorf("read settled deliveries: %w", err)
			}
			if i < 1 || i > len(at) {
				return fmt.Errorf("read settled deliveries: row %d of %d", i, len(at))
			}
			settled[at[i-1]] = &r
		}
		return rows.Err()
	})
	return settled, err
}

// pgText is s fit for a PostgreSQL text column: valid UTF-8 without NUL bytes.
func pgText(s string) string {
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "")
}

// purge deletes the rows of codes that expired more than retention ago.
func (st *store) purge(ctx context.Context, retention time.Duration) (int64, error) {
	tag, err := st.pool.Exec(ctx, `DELETE FROM dispatcher.deliveries WHERE expires_at < now() - $1::interval`, retention)
	return tag.RowsAffected(), err
}
