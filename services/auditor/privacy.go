package auditor

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Erase removes one recipient's personal data from the log: on every row about them the
// keyed hash, the masked address, the client IP and the session id are cleared, and the
// salt with them, so the digest that the chain holds can no longer be tied to the person.
// The chain stays verifiable. It returns the number of rows erased.
func Erase(ctx context.Context, pool *pgxpool.Pool, key []byte, recipient string) (int64, error) {
	h := RecipientHash(key, recipient)
	var n int64
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		// Rows about the recipient's challenges carry the client IP and session id too.
		tag, err := tx.Exec(ctx, `UPDATE audit.events SET recipient_hash = NULL, recipient_masked = '', pii = NULL,
				pii_salt = NULL, erased_at = now()
			WHERE pii_salt IS NOT NULL AND (recipient_hash = $1 OR (challenge_id <> '' AND challenge_id IN
				(SELECT challenge_id FROM audit.events WHERE recipient_hash = $1)))`, h)
		n = tag.RowsAffected()
		return err
	})
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
		if _, err := tx.Exec(ctx, `INSERT INTO audit.checkpoints (pos, hash, key_id, mac) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING`,
			*upTo, hash, keyID, mac); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `SET LOCAL otpflow.audit_purge = 'on'`); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `DELETE FROM audit.events WHERE chain_pos <= $1`, *upTo)
		n = tag.RowsAffected()
		return err
	})
	return n, err
}
