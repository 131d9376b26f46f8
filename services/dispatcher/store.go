package dispatcher

import (
	"context"
	"errors"
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
// each with a lease until the database clock plus lease.
func (st *store) claim(ctx context.Context, keys []deliveryKey, lease time.Duration,
	decide func(local, now time.Time, rows []deliveryRow) []claim) error {
	return pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		lock := &pgx.Batch{}
		for _, k := range keys {
			lock.Queue(`SELECT status, attempts, provider, provider_message_id, lease_until, ambiguous, confirmed, last_error
				FROM dispatcher.deliveries WHERE challenge_id = $1 AND code_seq = $2 FOR UPDATE`, k.challenge, k.seq)
		}
		rows := make([]deliveryRow, len(keys))
		res := tx.SendBatch(ctx, lock)
		for i := range keys {
			r := &rows[i]
			err := res.QueryRow().Scan(&r.status, &r.attempts, &r.provider, &r.providerMsg, &r.leaseUntil, &r.ambiguous, &r.confirmed, &r.lastError)
			switch {
			case errors.Is(err, pgx.ErrNoRows):
			case err != nil:
				res.Close()
				return fmt.Errorf("lock deliveries: %w", err)
			default:
				r.exists = true
			}
		}
		if err := res.Close(); err != nil {
			return err
		}
		local := time.Now()
		var now time.Time
		if err := tx.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&now); err != nil {
			return fmt.Errorf("read the database clock: %w", err)
		}
		writes := &pgx.Batch{}
		for _, c := range decide(local, now, rows) {
			dj := c.job
			if c.fresh {
				writes.Queue(`INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id, status, attempts,
					expires_at, claimed_at, lease_until) VALUES ($1, $2, $3, $4, 'sending', 1, $5, $6, $7)`,
					dj.ChallengeID, dj.CodeSeq, dj.Tenant, dj.RequestID, dj.ExpiresAt, now, now.Add(lease))
				continue
			}
			writes.Queue(`UPDATE dispatcher.deliveries SET attempts = attempts + 1, claimed_at = $3, lease_until = $4
				WHERE challenge_id = $1 AND code_seq = $2`, dj.ChallengeID, dj.CodeSeq, now, now.Add(lease))
		}
		return tx.SendBatch(ctx, writes).Close()
	})
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
// every completion applied.
func (st *store) complete(ctx context.Context, cs []completion) (settled []*deliveryRow, err error) {
	if len(cs) == 0 {
		return nil, nil
	}
	err = pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		settled = nil
		b := &pgx.Batch{}
		for _, c := range cs {
			// Text from providers is made fit for a text column (no NUL, valid UTF-8): the
			// database must never refuse the record of a mail that went out.
			lastError := pgText(c.lastError)
			switch {
			case c.status != "":
				b.Queue(`UPDATE dispatcher.deliveries SET status = $3, provider = $4, provider_message_id = $5, last_error = $6,
					confirmed = $7, completed_at = now(), lease_until = now()
					WHERE challenge_id = $1 AND code_seq = $2 AND status = 'sending'`,
					c.key.challenge, c.key.seq, c.status, pgText(c.provider), pgText(c.providerMsg), lastError, c.confirmed)
			case c.ambiguous:
				b.Queue(`UPDATE dispatcher.deliveries SET ambiguous = ambiguous + 1, last_error = $3, lease_until = now()
					WHERE challenge_id = $1 AND code_seq = $2 AND status = 'sending'`, c.key.challenge, c.key.seq, lastError)
			default:
				b.Queue(`UPDATE dispatcher.deliveries SET last_error = $3, lease_until = now()
					WHERE challenge_id = $1 AND code_seq = $2 AND status = 'sending'`, c.key.challenge, c.key.seq, lastError)
			}
		}
		res := tx.SendBatch(ctx, b)
		var missed []int
		for i := range cs {
			tag, err := res.Exec()
			if err != nil {
				res.Close()
				return fmt.Errorf("complete deliveries: %w", err)
			}
			if tag.RowsAffected() == 0 {
				missed = append(missed, i)
			}
		}
		if err := res.Close(); err != nil {
			return err
		}
		if len(missed) == 0 {
			return nil
		}
		read := &pgx.Batch{}
		for _, i := range missed {
			read.Queue(`SELECT status, attempts, provider, provider_message_id, confirmed, last_error
				FROM dispatcher.deliveries WHERE challenge_id = $1 AND code_seq = $2`, cs[i].key.challenge, cs[i].key.seq)
		}
		settled = make([]*deliveryRow, len(cs))
		rows := tx.SendBatch(ctx, read)
		defer rows.Close()
		for _, i := range missed {
			r := deliveryRow{exists: true}
			err := rows.QueryRow().Scan(&r.status, &r.attempts, &r.provider, &r.providerMsg, &r.confirmed, &r.lastError)
			switch {
			case errors.Is(err, pgx.ErrNoRows):
				// Purged: nobody will ask for it again, and what this worker learned stands.
			case err != nil:
				return fmt.Errorf("read settled deliveries: %w", err)
			default:
				settled[i] = &r
			}
		}
		return rows.Close()
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
