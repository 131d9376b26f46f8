package verifier

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// Erase is the verifier's part of an erasure: the person's projected challenges (their
// subject hashes and session id) and their codes are deleted, so a code of theirs still
// alive no longer verifies; and so are their requests' states (otp.status), at once, not
// when the status projection reaches the erasure event: rows found by the subject hash
// or by one of the person's challenges, whose ids are remembered as erased
// (verifier.request_status_erased, what the projection keeps for its own erasures) so a
// late or redelivered event of theirs does not make the row again. n counts the rows
// deleted. What it keeps on purpose is the per-recipient failure cap
// (a keyed hash and its stamps), until its window ends and the purge removes it, and the
// verify-limit counters, which are keyed by hash and last a minute; and the person's
// subject hashes in verifier.erasures for OTP_RETENTION, so that a code of theirs issued
// before the erasure and still on its way is dropped when it arrives.
//
// It holds the person's erasure locks exclusively (platform.RecordErasure), so a
// projection batch with a code of theirs (of either projection) runs wholly before it or
// wholly after. Then it locks the person's challenges, in the order verify groups lock
// them, and their status rows, in the order the status projection locks them ((tenant,
// request_id) bytewise), so it never waits on either crosswise.
func (s *Service) Erase(ctx context.Context, req events.ErasureRequested) (int64, error) {
	var n int64
	err := pgx.BeginFunc(ctx, s.store.pool, func(tx pgx.Tx) error {
		if err := platform.RecordErasure(ctx, tx, Schema, req); err != nil {
			return err
		}
		b := &pgx.Batch{}
		b.Queue(`SELECT 1 FROM verifier.challenges WHERE tenant = $1 AND recipient_keys && $2::text[]
			ORDER BY request_id COLLATE "C" FOR UPDATE`, req.Tenant, req.RecipientHashes)
		b.Queue(`SELECT 1 FROM verifier.request_status s WHERE `+personsStatusRows+`
			ORDER BY s.tenant COLLATE "C", s.request_id COLLATE "C" FOR UPDATE`, req.Tenant, req.RecipientHashes)
		b.Queue(`INSERT INTO verifier.request_status_erased (challenge_id)
			SELECT challenge_id FROM verifier.challenges WHERE tenant = $1 AND recipient_keys && $2::text[]
			UNION SELECT s.challenge_id FROM verifier.request_status s WHERE s.challenge_id IS NOT NULL AND `+personsStatusRows+`
			ON CONFLICT DO NOTHING`, req.Tenant, req.RecipientHashes)
		count := func(tag pgconn.CommandTag) error { n += tag.RowsAffected(); return nil }
		b.Queue(`DELETE FROM verifier.request_status s WHERE `+personsStatusRows, req.Tenant, req.RecipientHashes).Exec(count)
		b.Queue(`DELETE FROM verifier.codes WHERE challenge_id IN
			(SELECT challenge_id FROM verifier.challenges WHERE tenant = $1 AND recipient_keys && $2::text[])`,
			req.Tenant, req.RecipientHashes).Exec(count)
		b.Queue(`DELETE FROM verifier.challenges WHERE tenant = $1 AND recipient_keys && $2::text[]`,
			req.Tenant, req.RecipientHashes).Exec(count)
		return tx.SendBatch(ctx, b).Close()
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// personsStatusRows selects (as s) the status rows of the person with subject hashes $2
// in tenant $1: by the hash their otp.issued named, or, for a row a delivery made before
// its issuance was projected, by one of the person's challenges.
const personsStatusRows = `s.tenant = $1 AND (s.recipient_key = ANY ($2::text[]) OR s.challenge_id IN
	(SELECT c.challenge_id FROM verifier.challenges c WHERE c.tenant = $1 AND c.recipient_keys && $2::text[]))`
