package verifier

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// Erase is the verifier's part of an erasure: the person's projected challenges (their
// subject hashes and session id) and their codes are deleted, so a code of theirs still
// alive no longer verifies. What it keeps on purpose is the per-recipient failure cap
// (a keyed hash and its stamps), until its window ends and the purge removes it, and the
// verify-limit counters, which are keyed by hash and last a minute; and the person's
// subject hashes in verifier.erasures for OTP_RETENTION, so that a code of theirs issued
// before the erasure and still on its way is dropped when it arrives.
//
// It holds the person's erasure locks exclusively (platform.RecordErasure), so a
// projection batch with a code of theirs runs wholly before it or wholly after.
func (s *Service) Erase(ctx context.Context, req events.ErasureRequested) (int64, error) {
	var n int64
	err := pgx.BeginFunc(ctx, s.store.pool, func(tx pgx.Tx) error {
		if err := platform.RecordErasure(ctx, tx, Schema, req); err != nil {
			return err
		}
		// The person's challenges locked first, in the order verify groups lock them,
		// so the deletes below never wait on a group crosswise.
		if _, err := tx.Exec(ctx, `SELECT 1 FROM verifier.challenges WHERE tenant = $1 AND recipient_keys && $2::text[]
			ORDER BY request_id COLLATE "C" FOR UPDATE`, req.Tenant, req.RecipientHashes); err != nil {
			return err
		}
		codes, err := tx.Exec(ctx, `DELETE FROM verifier.codes WHERE challenge_id IN
			(SELECT challenge_id FROM verifier.challenges WHERE tenant = $1 AND recipient_keys && $2::text[])`, req.Tenant, req.RecipientHashes)
		if err != nil {
			return err
		}
		challenges, err := tx.Exec(ctx, `DELETE FROM verifier.challenges WHERE tenant = $1 AND recipient_keys && $2::text[]`,
			req.Tenant, req.RecipientHashes)
		n = codes.RowsAffected() + challenges.RowsAffected()
		return err
	})
	return n, err
}
