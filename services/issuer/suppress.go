package issuer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// Why a recipient is on the suppression list: the reasons of issuer.suppressions, and the
// Limit of an otp.rejected with reason suppressed.
const (
	SuppressedBounced    = "bounced"    // a permanent bounce (otp.feedback)
	SuppressedComplained = "complained" // a spam complaint (otp.feedback)
	SuppressedOperator   = "operator"   // otpflow suppression add
)

// suppression is one entry of the list, as a decision reads it.
type suppression struct {
	reason string
	until  time.Time // zero: for ever
}

func (s suppression) activeAt(now time.Time) bool { return s.until.IsZero() || now.Before(s.until) }

// suppressionReason is the reason feedback lists its recipient for, "" when it lists
// nobody: a permanent bounce or a complaint. A transient or undetermined bounce, a delay,
// a rejection by the provider (a virus scan, a template) and a mailbox delivery say
// nothing against the address.
func suppressionReason(f events.Feedback) string {
	switch {
	case f.Kind == events.FeedbackBounced && f.BounceType == "Permanent":
		return SuppressedBounced
	case f.Kind == events.FeedbackComplained:
		return SuppressedComplained
	}
	return ""
}

// runFeedback reads otp.feedback from OTP_EVENTS (events.IssuerFeedbackConsumer) and puts
// the recipient of a permanent bounce or a complaint on its tenant's suppression list, for
// the tenant policy's suppression.expiry. The dispatcher publishes feedback only from a
// notification whose tags carry its MAC, and only the dispatcher may publish it
// (deploy/nats), so an entry names a person a mail of ours really went to.
func (s *Service) runFeedback(ctx context.Context) error {
	cons, err := platform.Bind(ctx, s.js, events.StreamEvents, events.IssuerFeedbackConsumer)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: events.IssuerFeedbackConsumer.Durable, BatchSize: 20,
		JS: s.js, Log: s.log, Reg: s.reg, DeadLetters: &platform.DeadLetters{Sealer: s.cfg.DLQKey},
		Healthy: func(ctx context.Context) error { return s.store.pool.Ping(ctx) }})
	return c.Run(ctx, func(ctx context.Context, batch []*platform.Delivery) error {
		for _, d := range batch {
			if err := s.handleFeedback(ctx, d); err != nil {
				return err
			}
		}
		return nil
	})
}

func (s *Service) handleFeedback(ctx context.Context, d *platform.Delivery) error {
	typ, tenant, err := events.SplitSubject(d.Subject())
	var f events.Feedback
	if err == nil {
		var v any
		if v, err = events.DecodeEventOf(typ, d.Data()); err == nil {
			var ok bool
			if f, ok = v.(events.Feedback); !ok {
				err = fmt.Errorf("%s is not feedback", typ)
			}
		}
	}
	switch {
	case err != nil:
		d.Settle(platform.DeadLetter(tenant, "issuer: feedback: "+err.Error()))
		return nil
	case f.Tenant != tenant:
		d.Settle(platform.DeadLetter(tenant, "issuer: feedback: its tenant is not its subject's"))
		return nil
	case f.RecipientHash != "" && !events.IsSubjectHash(f.RecipientHash):
		d.Settle(platform.DeadLetter(tenant, "issuer: feedback: recipient_hash is not a subject hash"))
		return nil
	}
	reason := suppressionReason(f)
	p := s.cfg.Policies.For(tenant).Suppression
	if reason == "" || f.RecipientHash == "" || p.Disabled {
		d.Settle(platform.Ack())
		return nil
	}
	at := f.OccurredAt
	if at.IsZero() {
		at = d.Meta().Timestamp
	}
	var until *time.Time
	if p.Expiry > 0 {
		u := at.Add(p.Expiry)
		until = &u
	}
	// Feedback read after the person was erased (the erasure was asked after OTP_EVENTS
	// stored it) lists nobody: the erasure wins, as it does for a request in flight.
	tag, err := s.store.pool.Exec(ctx, `INSERT INTO issuer.suppressions AS s
			(tenant, recipient_key, reason, challenge_id, source, created_at, expires_at)
		SELECT $1, $2, $3, $4, $5, $6, $7
		WHERE NOT EXISTS (SELECT 1 FROM issuer.erasures e WHERE e.tenant = $1 AND e.recipient_key = $2 AND e.erased_at >= $8)
		ON CONFLICT (tenant, recipient_key) DO UPDATE SET
			reason = EXCLUDED.reason, challenge_id = EXCLUDED.challenge_id, source = EXCLUDED.source,
			created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
		-- the entry that lasts longer wins: an operator's, or one for ever, is not cut short
		WHERE s.expires_at IS NOT NULL AND (EXCLUDED.expires_at IS NULL OR EXCLUDED.expires_at > s.expires_at)`,
		tenant, f.RecipientHash, reason, f.ChallengeID, d.Headers().Get(jetstream.MsgIDHeader), at.UTC(), until, d.Meta().Timestamp.UTC())
	if err != nil {
		if refused, ok := platform.RefusedByDatabase(err); ok {
			d.Settle(platform.DeadLetter(tenant, "issuer: feedback: "+refused.Error()))
			return nil
		}
		return fmt.Errorf("suppress a recipient: %w", err)
	}
	if tag.RowsAffected() > 0 {
		s.suppressed.WithLabelValues(reason).Inc()
		s.log.Info("recipient suppressed", "tenant", tenant, "reason", reason, "challenge_id", f.ChallengeID)
	}
	d.Settle(platform.Ack())
	return nil
}

// Suppression is one entry of a tenant's suppression list, as operators see it: the person
// only by subject hash.
type Suppression struct {
	Tenant        string     `json:"tenant"`
	RecipientHash string     `json:"recipient_hash"`
	Reason        string     `json:"reason"`
	ChallengeID   string     `json:"challenge_id,omitempty"`
	Source        string     `json:"source"`
	CreatedAt     time.Time  `json:"created_at"`
	ExpiresAt     *time.Time `json:"expires_at,omitempty"`
}

// ListSuppressions returns tenant's entries, newest first, those of hashes only when
// hashes is not empty, at most limit (0: all).
func ListSuppressions(ctx context.Context, pool *pgxpool.Pool, tenant string, hashes []string, limit int) ([]Suppression, error) {
	q := `SELECT tenant, recipient_key, reason, coalesce(challenge_id::text, ''), source, created_at, expires_at
		FROM issuer.suppressions WHERE tenant = $1 AND (coalesce(cardinality($2::text[]), 0) = 0 OR recipient_key = ANY ($2))
		ORDER BY created_at DESC, recipient_key`
	if limit > 0 {
		q += fmt.Sprintf(" LIMIT %d", limit)
	}
	rows, err := pool.Query(ctx, q, tenant, hashes)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Suppression, error) {
		var s Suppression
		err := r.Scan(&s.Tenant, &s.RecipientHash, &s.Reason, &s.ChallengeID, &s.Source, &s.CreatedAt, &s.ExpiresAt)
		return s, err
	})
}

// ErrNotSuppressed is returned by Unsuppress when the recipient is not listed.
var ErrNotSuppressed = errors.New("the recipient is not on the suppression list")

// Suppress lists a recipient of tenant by an operator's decision (reason operator), under
// hash (its subject hash under the active key), until until (nil: for ever), replacing an
// entry from feedback. source names the operator action.
func Suppress(ctx context.Context, pool *pgxpool.Pool, tenant, hash, source string, until *time.Time) error {
	if !events.IsSubjectHash(hash) {
		return errors.New("not a subject hash")
	}
	_, err := pool.Exec(ctx, `INSERT INTO issuer.suppressions (tenant, recipient_key, reason, source, created_at, expires_at)
		VALUES ($1, $2, 'operator', $3, now(), $4)
		ON CONFLICT (tenant, recipient_key) DO UPDATE SET reason = 'operator', challenge_id = NULL, source = EXCLUDED.source,
			created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at`, tenant, hash, source, until)
	return err
}

// Unsuppress takes a recipient of tenant off the list, under every hash given (its
// subject hashes under every key of the ring), and returns the entries it removed.
func Unsuppress(ctx context.Context, pool *pgxpool.Pool, tenant string, hashes []string) ([]Suppression, error) {
	rows, err := pool.Query(ctx, `DELETE FROM issuer.suppressions WHERE tenant = $1 AND recipient_key = ANY ($2)
		RETURNING tenant, recipient_key, reason, coalesce(challenge_id::text, ''), source, created_at, expires_at`, tenant, hashes)
	if err != nil {
		return nil, err
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Suppression, error) {
		var s Suppression
		err := r.Scan(&s.Tenant, &s.RecipientHash, &s.Reason, &s.ChallengeID, &s.Source, &s.CreatedAt, &s.ExpiresAt)
		return s, err
	})
	if err == nil && len(out) == 0 {
		err = ErrNotSuppressed
	}
	return out, err
}
