package platform

import (
	"context"
	"log/slog"
	"time"
)

// Retention is how long settled challenges (expired, used, superseded) stay in a service's
// tables after their last code expired (OTP_RETENTION, default 24h): long enough to answer
// "already used" and "expired" for a day, and past every redelivery and dedup window.
const Retention = 24 * time.Hour

// PurgeEvery runs purge every interval until ctx is cancelled, logging what it removed.
func PurgeEvery(ctx context.Context, interval time.Duration, log *slog.Logger, purge func(context.Context) (int64, error)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		n, err := purge(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("retention purge", "err", err)
		case n > 0:
			log.Info("retention purge", "rows", n)
		}
	}
}
