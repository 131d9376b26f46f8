package verifier

import (
	"context"

	"github.com/jackc/pgx/v5"
)

// Purge deletes challenges whose newest code expired, or that were used, locked or
// superseded, more than the retention ago, with their codes; failure stamps older than
// an hour; and verify-limit windows that no longer count. Every cutoff is on the
// database clock.
func (s *Service) Purge(ctx context.Context) (int64, error) {
	retention := s.cfg.Retention.Microseconds()
	var total int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT c.challenge_id FROM verifier.challenges c
			WHERE (c.status <> 'active' AND c.updated_at < now() - $1::bigint * interval '1 microsecond')
			   OR NOT EXISTS (SELECT 1 FROM verifier.codes k WHERE k.challenge_id = c.challenge_id
			                  AND k.expires_at >= now() - $1::bigint * interval '1 microsecond')
			FOR UPDATE SKIP LOCKED`, retention)
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
	tag, err := s.pool.Exec(ctx, `DELETE FROM verifier.recipient_failures
		WHERE coalesce(stamps[array_upper(stamps, 1)], '-infinity') < now() - interval '1 hour'`)
	if err != nil {
		return total, err
	}
	total += tag.RowsAffected()
	tag, err = s.pool.Exec(ctx, `DELETE FROM verifier.verify_limits WHERE window_start < now() - interval '2 minutes'`)
	return total + tag.RowsAffected(), err
}
