package auditor

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/platform/keys"
)

// Erase removes one recipient's personal data from the log: on every row about them the
// subject hash, the masked address and the client hash are cleared, and the salt with
// them, so the digest that the chain holds can no longer be tied to the person. The
// person is found by their subject hash under every key of the ring, in every tenant of
// the log. The chain stays verifiable. It calls audit.erase, which only the log's owner
// may run: pool must be an administrator's (the auditor's role erases only what a chained
// erasure request names, EraseChained). It returns the number of rows erased.
//
// otpflow erase does more (every service, the streams) through otp.erasure_requested;
// this is the log's part alone, for a log whose pipeline is gone.
func Erase(ctx context.Context, pool *pgxpool.Pool, subjects *keys.Subjects, recipient string) (int64, error) {
	rows, err := pool.Query(ctx, `SELECT DISTINCT tenant FROM audit.events WHERE recipient_hash IS NOT NULL`)
	if err != nil {
		return 0, err
	}
	tenants, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return 0, err
	}
	var hs [][]byte
	for _, t := range tenants {
		hs = append(hs, SubjectHashes(subjects, t, recipient)...)
	}
	var n int64
	err = pool.QueryRow(ctx, `SELECT audit.erase($1)`, hs).Scan(&n)
	return n, err
}

// Purge deletes the oldest rows, those that occurred before cutoff, as one prefix of the
// chain, and records a checkpoint (the last purged position and hash) from which the
// rest still verifies, authenticated by the chain key (a checkpoint row without it reads as
// forged). It returns the number of rows deleted.
func (c *Chain) Purge(ctx context.Context, pool *pgxpool.Pool, cutoff time.Time) (int64, error) {
	var n int64
	keyID := c.KeyID()
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var upTo *int64
		err := tx.QueryRow(ctx, `SELECT CASE WHEN min(chain_pos) FILTER (WHERE occurred_at >= $1) IS NULL THEN max(chain_pos)
			ELSE min(chain_pos) FILTER (WHERE occurred_at >= $1) - 1 END FROM audit.events`, cutoff).Scan(&upTo)
		if err != nil || upTo == nil || *upTo < 1 {
			return err
		}
		var hash []byte
		if err := tx.QueryRow(ctx, `SELECT row_hash FROM audit.events WHERE chain_pos = $1`, *upTo).Scan(&hash); err != nil {
			return fmt.Errorf("checkpoint row: %w", err)
		}
		mac, err := c.checkpointMAC(keyID, *upTo, hash)
		if err != nil {
			return err
		}
		// As the log's owner: the auditor's role may not delete (migrations/00004_roles.sql).
		return tx.QueryRow(ctx, `SELECT audit.purge($1, $2, $3, $4)`, *upTo, hash, keyID, mac).Scan(&n)
	})
	return n, err
}
