package issuer

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
	// since is when the bounce or complaint happened (an operator's entry: when it was
	// made); until, for an operator's entry, when it lapses (zero: never).
	since, until time.Time
}

// activeAt reports whether the entry refuses a request at now under the tenant's expiry
// (policy suppression.expiry, zero: never), which applies to entries made from feedback
// as the policy stands now: a shorter or a longer expiry reaches the entries already made.
func (s suppression) activeAt(now time.Time, expiry time.Duration) bool {
	if s.reason == SuppressedOperator {
		return s.until.IsZero() || now.Before(s.until)
	}
	return expiry == 0 || now.Before(s.since.Add(expiry))
}

// suppressionReason is the reason feedback lists its recipient for, "" when it lists
// nobody: a permanent bounce or a complaint. A transient or undetermined bounce, a delay,
// a rejection by the provider (a virus scan, a template) and a mailbox delivery say
// nothing against the address.
func suppressionReason(f events.Feedback) string {
	switch {
	case f.Kind == events.FeedbackBounced && strings.EqualFold(f.BounceType, "Permanent"):
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
	case !events.IsUUID(f.ChallengeID):
		d.Settle(platform.DeadLetter(tenant, "issuer: feedback: challenge_id is not a UUID"))
		return nil
	}
	reason := suppressionReason(f)
	if reason == "" || f.RecipientHash == "" || s.cfg.Policies.For(tenant).Suppression.Disabled {
		d.Settle(platform.Ack())
		return nil
	}
	stored := d.Meta().Timestamp.UTC()
	// Feedback older than the erasure records (OTP_RETENTION: the issuer was down that
	// long) could list a person erased since: it lists nobody.
	if age := time.Since(stored) + s.skewBy(); age > s.cfg.Retention {
		s.log.Warn("feedback too old to list its recipient: the erasures it could undo are forgotten",
			"tenant", tenant, "challenge_id", f.ChallengeID, "age", age.Round(time.Second))
		s.suppressed.WithLabelValues("too_old").Inc()
		d.Settle(platform.Ack())
		return nil
	}
	at := f.OccurredAt
	if at.IsZero() {
		at = stored
	}
	var added bool
	err = pgx.BeginFunc(ctx, s.store.pool, func(tx pgx.Tx) error {
		// The person's erasure lock, shared, as a batch takes it: an erasure running now
		// either comes first (and its record refuses the entry below) or after (and
		// deletes it).
		b := &pgx.Batch{}
		platform.QueueErasureLocksShared(b, Schema, []string{tenant}, []string{f.RecipientHash})
		if err := tx.SendBatch(ctx, b).Close(); err != nil {
			return err
		}
		// Feedback read after the person was erased (the erasure was asked after
		// OTP_EVENTS stored it) lists nobody: the erasure wins, as it does for a request
		// in flight. A later bounce or complaint restarts the entry's clock; an operator's
		// entry for ever is left as it is.
		// Nor does a bounce or complaint from before an operator took the person off the
		// list: the operator has seen it.
		tag, err := tx.Exec(ctx, `INSERT INTO issuer.suppressions AS s
				(tenant, recipient_key, reason, challenge_id, source, created_at, expires_at)
			SELECT $1, $2, $3, $4, $5, $6, NULL
			WHERE NOT EXISTS (SELECT 1 FROM issuer.erasures e WHERE e.tenant = $1 AND e.recipient_key = $2 AND e.erased_at >= $7)
			  AND NOT EXISTS (SELECT 1 FROM issuer.suppression_removals r WHERE r.tenant = $1 AND r.recipient_key = $2 AND r.removed_at >= $6)
			ON CONFLICT (tenant, recipient_key) DO UPDATE SET
				reason = EXCLUDED.reason, challenge_id = EXCLUDED.challenge_id, source = EXCLUDED.source,
				created_at = EXCLUDED.created_at, expires_at = NULL
			WHERE s.reason <> 'operator' AND EXCLUDED.created_at > s.created_at
			   OR s.reason = 'operator' AND s.expires_at IS NOT NULL`,
			tenant, f.RecipientHash, reason, f.ChallengeID, d.Headers().Get(jetstream.MsgIDHeader), at.UTC(), stored)
		added = err == nil && tag.RowsAffected() > 0
		return err
	})
	if err != nil {
		if refused, ok := platform.RefusedByDatabase(err); ok {
			d.Settle(platform.DeadLetter(tenant, "issuer: feedback: "+refused.Error()))
			return nil
		}
		return fmt.Errorf("suppress a recipient: %w", err)
	}
	if added {
		s.suppressed.WithLabelValues(reason).Inc()
		s.log.Info("recipient suppressed", "tenant", tenant, "reason", reason, "challenge_id", f.ChallengeID)
	}
	d.Settle(platform.Ack())
	return nil
}

// Suppression is one entry of a tenant's suppression list, as operators see it: the person
// only by subject hash. CreatedAt is when the bounce or complaint happened, or when the
// operator made the entry; ExpiresAt is set on an operator's entry for a while (an entry
// from feedback lapses by the tenant's suppression.expiry, counted from CreatedAt).
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
	return pgx.CollectRows(rows, scanSuppression)
}

// ErrNotSuppressed is returned by Unsuppress when the recipient is not listed.
var ErrNotSuppressed = errors.New("the recipient is not on the suppression list")

// Suppress lists a recipient of tenant by an operator's decision (reason operator), under
// hash (its subject hash under the active key), for d (0: until removed) on the database
// clock. It never shortens an entry: one that already lasts at least as long is left as it
// is, and Suppress reports false. source names the operator action.
func Suppress(ctx context.Context, pool *pgxpool.Pool, tenant, hash, source string, d time.Duration) (bool, error) {
	if !events.IsSubjectHash(hash) {
		return false, errors.New("not a subject hash")
	}
	var forever any
	if d > 0 {
		forever = d
	}
	tag, err := pool.Exec(ctx, `INSERT INTO issuer.suppressions AS s (tenant, recipient_key, reason, source, created_at, expires_at)
		VALUES ($1, $2, 'operator', $3, now(), now() + $4::interval)
		ON CONFLICT (tenant, recipient_key) DO UPDATE SET reason = 'operator', challenge_id = NULL, source = EXCLUDED.source,
			created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
		WHERE s.reason = 'operator' AND s.expires_at IS NOT NULL AND (EXCLUDED.expires_at IS NULL OR EXCLUDED.expires_at > s.expires_at)
		   OR s.reason <> 'operator' AND EXCLUDED.expires_at IS NULL`, tenant, hash, source, forever)
	return err == nil && tag.RowsAffected() > 0, err
}

// Unlist chooses the entries Unsuppress removes: those of the hashes given (a recipient's
// subject hashes under every key of the ring), or every entry of the tenant with Reason
// (when set) made at or after Since (when set). At least one of the three must be set.
type Unlist struct {
	Hashes []string
	Reason string
	Since  time.Time
}

// Unsuppress takes entries of tenant off the list and returns those it removed.
func Unsuppress(ctx context.Context, pool *pgxpool.Pool, tenant string, u Unlist) ([]Suppression, error) {
	if len(u.Hashes) == 0 && u.Reason == "" && u.Since.IsZero() {
		return nil, errors.New("name the entries to remove: a recipient, a hash, a reason or a time")
	}
	var since *time.Time
	if !u.Since.IsZero() {
		since = &u.Since
	}
	// The removal is remembered by hash (issuer.suppression_removals), so that feedback
	// about what happened before it does not list the person again.
	rows, err := pool.Query(ctx, `WITH gone AS (DELETE FROM issuer.suppressions WHERE tenant = $1
			AND (coalesce(cardinality($2::text[]), 0) = 0 OR recipient_key = ANY ($2))
			AND ($3 = '' OR reason = $3) AND ($4::timestamptz IS NULL OR created_at >= $4)
		RETURNING tenant, recipient_key, reason, challenge_id, source, created_at, expires_at),
		kept AS (INSERT INTO issuer.suppression_removals (tenant, recipient_key, removed_at)
			SELECT tenant, recipient_key, now() FROM gone
			UNION SELECT $1, h, now() FROM unnest($2::text[]) AS h
			ON CONFLICT (tenant, recipient_key) DO UPDATE SET removed_at = EXCLUDED.removed_at)
		SELECT tenant, recipient_key, reason, coalesce(challenge_id::text, ''), source, created_at, expires_at FROM gone`,
		tenant, u.Hashes, u.Reason, since)
	if err != nil {
		return nil, err
	}
	out, err := pgx.CollectRows(rows, scanSuppression)
	if err == nil && len(out) == 0 {
		err = ErrNotSuppressed
	}
	return out, err
}

func scanSuppression(r pgx.CollectableRow) (Suppression, error) {
	var s Suppression
	err := r.Scan(&s.Tenant, &s.RecipientHash, &s.Reason, &s.ChallengeID, &s.Source, &s.CreatedAt, &s.ExpiresAt)
	return s, err
}
