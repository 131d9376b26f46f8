package issuer

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// Erase is the issuer's part of an erasure: the person's challenges (their sealed
// address, session id and subject hash), their codes and the records of their resend
// messages and their suppression list entries are deleted, with the
// otp.challenge messages of theirs still in the outbox (a code HMAC and a session). A
// later request with one of their request ids is a new request; one stored before the
// erasure and still in flight is refused (reason erased), for which the person's subject
// hashes are kept in issuer.erasures for OTP_RETENTION. What it also keeps on purpose
// are keyed hashes that prevent harm: the per-recipient and per-client rate-limit stamps
// and the client fan-out sets, until their windows end and the purge removes them.
//
// It holds the person's erasure locks exclusively (platform.RecordErasure), so a batch
// deciding a request of theirs runs wholly before it or wholly after.
func (s *Service) Erase(ctx context.Context, req events.ErasureRequested) (int64, error) {
	var n int64
	err := pgx.BeginFunc(ctx, s.store.pool, func(tx pgx.Tx) error {
		if err := platform.RecordErasure(ctx, tx, Schema, req); err != nil {
			return err
		}
		outbox, err := tx.Exec(ctx, `DELETE FROM issuer.outbox o USING issuer.challenges c
			WHERE c.tenant = $1 AND c.recipient_key = ANY ($2) AND o.subject = 'otp.challenge.' || c.tenant
			  AND o.header->'`+"Nats-Msg-Id"+`'->>0 LIKE 'challenge:' || c.challenge_id::text || ':%'`, req.Tenant, req.RecipientHashes)
		if err != nil {
			return err
		}
		codes, err := tx.Exec(ctx, `DELETE FROM issuer.codes WHERE challenge_id IN
			(SELECT challenge_id FROM issuer.challenges WHERE tenant = $1 AND recipient_key = ANY ($2))`, req.Tenant, req.RecipientHashes)
		if err != nil {
			return err
		}
		challenges, err := tx.Exec(ctx, `DELETE FROM issuer.challenges WHERE tenant = $1 AND recipient_key = ANY ($2)`,
			req.Tenant, req.RecipientHashes)
		if err != nil {
			return err
		}
		resends, err := tx.Exec(ctx, `DELETE FROM issuer.resend_messages WHERE tenant = $1 AND recipient_key = ANY ($2)`,
			req.Tenant, req.RecipientHashes)
		if err != nil {
			return err
		}
		suppressions, err := tx.Exec(ctx, `WITH r AS (DELETE FROM issuer.suppression_removals WHERE tenant = $1 AND recipient_key = ANY ($2))
			DELETE FROM issuer.suppressions WHERE tenant = $1 AND recipient_key = ANY ($2)`,
			req.Tenant, req.RecipientHashes)
		n = outbox.RowsAffected() + codes.RowsAffected() + challenges.RowsAffected() + resends.RowsAffected() + suppressions.RowsAffected()
		return err
	})
	return n, err
}
