package issuer

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// Raise is the record of the issuers' backlog alert (platform.AlertGate): it publishes
// rule about key (the oldest unprocessed request) and records it in issuer.alerts_raised,
// unless an issuer raised it about key before, or less than every ago about another. The
// upsert holds the rule's row until publish has returned and the record committed, so
// two issuers never both raise it, and a restarted one knows what the last one raised.
// Time is the database's.
func (st *store) Raise(ctx context.Context, rule string, key uint64, every time.Duration, publish func(context.Context) error) (bool, error) {
	raised := false
	err := pgx.BeginFunc(ctx, st.pool, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `INSERT INTO issuer.alerts_raised AS a (rule, oldest, raised_at) VALUES ($1, $2, now() + $3::interval)
			ON CONFLICT (rule) DO UPDATE SET oldest = excluded.oldest, raised_at = excluded.raised_at
			WHERE a.oldest <> excluded.oldest AND a.raised_at <= excluded.raised_at - $4::interval
			RETURNING true`, rule, int64(key), st.skew(), every).Scan(&raised)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		return publish(ctx)
	})
	return raised && err == nil, err
}
