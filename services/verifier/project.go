package verifier

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// projection is one event of a batch, checked and ready to write.
type projection struct {
	msg *platform.Delivery
	// queue adds the event's statements to b; the callbacks it registers record a
	// refusal that the database reports without an error in *refused.
	queue   func(b *pgx.Batch, refused *error)
	refused error
}

// project writes a batch of otp.issued and otp.superseded events in one transaction.
// The projection checks its inputs like the issuer checks requests: an event that does
// not decode, names a tenant other than its subject's, or carries a malformed field goes
// to OTP_DLQ with the reason and the rest of the batch is projected. If the database
// refuses the batch, the error goes back to the consumer, which hands each event over
// on its own, so one event the database refuses is dead-lettered instead of holding back
// its neighbours; any other failure of a lone event is retried by the consumer.
func (s *Service) project(ctx context.Context, batch []*platform.Delivery) error {
	if s.beforeProject != nil {
		s.beforeProject()
	}
	items := make([]*projection, 0, len(batch))
	for _, d := range batch {
		p, err := s.check(d)
		if err != nil {
			s.deadLetter(d, err)
			continue
		}
		items = append(items, p)
	}
	if len(items) == 0 {
		return nil
	}
	err := s.write(ctx, items)
	if err == nil {
		s.settle(items)
		return nil
	}
	if refused, ok := refusedByDatabase(err); ok && len(items) == 1 {
		s.deadLetter(items[0].msg, refused)
		return nil
	}
	return fmt.Errorf("project %d events: %w", len(items), err)
}

// write runs the statements of items in one transaction.
func (s *Service) write(ctx context.Context, items []*projection) error {
	b := &pgx.Batch{}
	for _, p := range items {
		p.refused = nil
		p.queue(b, &p.refused)
	}
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return tx.SendBatch(ctx, b).Close() })
}

// settle acks what was projected and dead-letters what the database refused quietly
// (its statements changed nothing).
func (s *Service) settle(items []*projection) {
	for _, p := range items {
		if p.refused != nil {
			s.deadLetter(p.msg, p.refused)
			continue
		}
		s.projected.Inc()
		p.msg.Settle(platform.Ack())
	}
}

func (s *Service) deadLetter(d *platform.Delivery, reason error) {
	_, tenant, _ := events.SplitSubject(d.Subject())
	s.deadLettered.Inc()
	s.log.Warn("dead-letter event", "subject", d.Subject(), "reason", reason)
	d.Settle(platform.DeadLetter(tenant, "verifier: "+reason.Error()))
}

// errRefused is a database error that no redelivery will cure: a data exception, an
// integrity or a size limit violation. Its text names the SQLSTATE, the constraint and
// the column, never the message, which may quote the refused value.
type errRefused struct{ pg *pgconn.PgError }

func (e errRefused) Error() string {
	s := "database refused the event (SQLSTATE " + e.pg.Code
	if e.pg.ConstraintName != "" {
		s += ", constraint " + e.pg.ConstraintName
	}
	if e.pg.ColumnName != "" {
		s += ", column " + e.pg.ColumnName
	}
	return s + ")"
}

func (e errRefused) Unwrap() error { return e.pg }

// refusedByDatabase tells an event the database will never accept from a failure worth
// retrying.
func refusedByDatabase(err error) (errRefused, bool) {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return errRefused{}, false
	}
	switch pgErr.Code[:2] {
	case "22", "23", "54":
		return errRefused{pgErr}, true
	}
	return errRefused{}, false
}

// errChallengeOwned: an otp.issued names a challenge id the projection holds for another
// request (or a request id it holds with another challenge id).
var errChallengeOwned = &events.ValidationError{Reason: events.ReasonInvalidField, Field: "challenge_id",
	Detail: "belongs to another request of the projection"}

// check decodes m and validates it against its subject.
func (s *Service) check(m *platform.Delivery) (*projection, error) {
	typ, tenant, err := events.SplitSubject(m.Subject())
	if err != nil {
		return nil, err
	}
	switch typ {
	case events.TypeIssued:
		var e events.Issued
		if err := events.DecodeEvent(m.Data(), &e); err != nil {
			return nil, err
		}
		if err := checkIssued(tenant, e); err != nil {
			return nil, err
		}
		return &projection{msg: m, queue: func(b *pgx.Batch, refused *error) { s.queueIssued(b, refused, tenant, e) }}, nil
	case events.TypeSuperseded:
		var e events.Superseded
		if err := events.DecodeEvent(m.Data(), &e); err != nil {
			return nil, err
		}
		if err := checkCommon(tenant, e.Tenant, e.ChallengeID, e.RequestID); err != nil {
			return nil, err
		}
		return &projection{msg: m, queue: func(b *pgx.Batch, _ *error) {
			// Scoped to the subject's tenant and the request: an event can only close a
			// challenge it names exactly.
			b.Queue(`UPDATE verifier.challenges SET status = 'superseded', updated_at = now()
				WHERE challenge_id = $1 AND tenant = $2 AND request_id = $3 AND status = 'active'`,
				e.ChallengeID, tenant, e.RequestID)
		}}, nil
	default:
		return nil, &events.ValidationError{Reason: events.ReasonInvalidField, Field: "subject",
			Detail: fmt.Sprintf("the verifier does not project %s", typ)}
	}
}

func (s *Service) queueIssued(b *pgx.Batch, refused *error, tenant string, e events.Issued) {
	b.Queue(`INSERT INTO verifier.challenges (tenant, request_id, challenge_id, max_attempts, session_id, recipient_key, test, risk)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING`, tenant, e.RequestID, e.ChallengeID, e.MaxAttempts,
		e.SessionID, events.CanonicalAddress(e.Recipient), e.Test, append([]string{}, e.Risk...))
	// A code joins its challenge only if the challenge is this event's own (tenant,
	// request_id, challenge_id); otherwise nothing is written and the event is refused.
	b.Queue(`WITH c AS (SELECT challenge_id FROM verifier.challenges WHERE challenge_id = $1 AND tenant = $7 AND request_id = $8),
			ins AS (INSERT INTO verifier.codes (challenge_id, code_seq, code_hmac, pepper_key_id, expires_at, issued_at)
				SELECT challenge_id, $2, $3, $4, $5, $6 FROM c ON CONFLICT DO NOTHING)
		SELECT EXISTS (SELECT 1 FROM c)`,
		e.ChallengeID, e.CodeSeq, e.CodeHMAC, e.PepperKeyID, e.ExpiresAt, e.IssuedAt, tenant, e.RequestID).
		QueryRow(func(row pgx.Row) error {
			var own bool
			if err := row.Scan(&own); err != nil {
				return err
			}
			if !own {
				*refused = errChallengeOwned
			}
			return nil
		})
	// Risk rule recipient_failures: a new challenge for a recipient with recent failed
	// verifications (on earlier challenges) gets fewer attempts. Test recipients too: a
	// fixed code must not be cheaper to guess. The window is measured on the database clock.
	if rf := s.cfg.Policies.For(tenant).Risk.RecipientFailures; rf.Failures > 0 && e.CodeSeq == 1 {
		b.Queue(`UPDATE verifier.challenges c SET max_attempts = LEAST(c.max_attempts, $3),
				risk = array_append(c.risk, 'recipient_failures')
			FROM verifier.recipient_failures f
			WHERE c.challenge_id = $1 AND c.tenant = $5 AND c.request_id = $6
				AND c.attempts = 0 AND NOT ('recipient_failures' = ANY (c.risk))
				AND f.tenant = c.tenant AND f.recipient_key = c.recipient_key
				AND (SELECT count(*) FROM unnest(f.stamps) AS s(t) WHERE s.t > now() - $2::bigint * interval '1 microsecond') >= $4`,
			e.ChallengeID, rf.Window.Microseconds(), rf.MaxAttempts, rf.Failures, tenant, e.RequestID)
	}
}

// Bounds of the projected fields: what the issuer can produce, and what the projection's
// columns and indexes hold.
const (
	maxRequestID  = 128
	maxRecipient  = 254
	maxSession    = 128
	maxKeyID      = 64
	maxCodeSeq    = 1_000_000
	maxAttempts   = 1_000
	maxRiskLabels = 16
)

func field(name, detail string, args ...any) error {
	return &events.ValidationError{Reason: events.ReasonInvalidField, Field: name, Detail: fmt.Sprintf(detail, args...)}
}

// checkCommon checks what every projected event carries: the tenant of its subject, a
// UUID challenge id and a request id.
func checkCommon(subjectTenant, bodyTenant, challengeID, requestID string) error {
	switch {
	case bodyTenant != subjectTenant:
		return &events.ValidationError{Reason: events.ReasonInvalidTenant, Field: "tenant", Detail: "differs from the subject's tenant"}
	case !events.IsUUID(challengeID):
		return field("challenge_id", "must be a lowercase UUID")
	case requestID == "" || len(requestID) > maxRequestID:
		return field("request_id", "must be 1 to %d bytes", maxRequestID)
	}
	return text("request_id", requestID)
}

func checkIssued(tenant string, e events.Issued) error {
	if err := checkCommon(tenant, e.Tenant, e.ChallengeID, e.RequestID); err != nil {
		return err
	}
	switch {
	case e.CodeSeq < 1 || e.CodeSeq > maxCodeSeq:
		return field("code_seq", "must be from 1 to %d", maxCodeSeq)
	case len(e.CodeHMAC) == 0:
		return &events.ValidationError{Reason: events.ReasonMissingField, Field: "code_hmac", Detail: "required"}
	case e.PepperKeyID == "" || len(e.PepperKeyID) > maxKeyID:
		return field("pepper_key_id", "must be 1 to %d bytes", maxKeyID)
	case e.MaxAttempts < 1 || e.MaxAttempts > maxAttempts:
		return field("max_attempts", "must be from 1 to %d", maxAttempts)
	case e.ExpiresAt.IsZero():
		return &events.ValidationError{Reason: events.ReasonMissingField, Field: "expires_at", Detail: "required"}
	case len(e.Recipient) > maxRecipient:
		return field("recipient", "longer than %d bytes", maxRecipient)
	case len(e.SessionID) > maxSession:
		return field("session_id", "longer than %d bytes", maxSession)
	case len(e.Risk) > maxRiskLabels:
		return field("risk", "more than %d rules", maxRiskLabels)
	}
	for _, f := range []struct{ name, value string }{{"pepper_key_id", e.PepperKeyID}, {"recipient", e.Recipient}, {"session_id", e.SessionID}} {
		if err := text(f.name, f.value); err != nil {
			return err
		}
	}
	for _, r := range e.Risk {
		if err := text("risk", r); err != nil {
			return err
		}
	}
	return nil
}

// text refuses what PostgreSQL's text type cannot store (NUL) and line breaks.
func text(name, s string) error {
	if strings.ContainsAny(s, "\x00\r\n") {
		return field(name, "must not contain NUL, CR or LF")
	}
	return nil
}
