package verifier

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// projection is one event of a batch, checked and ready to write: a code of a challenge
// (otp.challenge, or an otp.issued of an earlier release that carries the code HMAC) or a
// supersession, for the subject's tenant. An otp.issued of this release carries nothing
// the verifier needs: it is acknowledged and writes nothing.
type projection struct {
	msg        *platform.Delivery
	tenant     string
	challenge  *events.Challenge
	superseded *events.Superseded
	// failureRisk is the recipient_failures risk rule for the first code of a challenge
	// (zero: none applies).
	failureRisk failureRisk
	// refused is set by the store when the database refuses the event without an error.
	refused error
	// erased is set by the store for a code of a person erased after it was issued: it is
	// dropped, not projected.
	erased bool
	// traceParent is the message's: the issuer's span, which a verify of the code links to.
	traceParent string
}

// failureRisk: a new challenge for a recipient with at least failures failed
// verifications within window (on earlier challenges) gets at most maxAttempts attempts.
type failureRisk struct {
	failures    int
	window      time.Duration
	maxAttempts int
}

// project writes a batch of challenge and supersession events in one transaction.
// The projection checks its inputs like the issuer checks requests: an event that does
// not decode, names a tenant other than its subject's, or carries a malformed field goes
// to OTP_DLQ with the reason and the rest of the batch is projected. If the transaction
// fails, the error goes back to the consumer, which hands each event over on its own: one
// the database refuses is dead-lettered at once, one that keeps failing while the others
// are projected is dead-lettered after its retries, and a database outage is waited out
// without dead-lettering anything (platform.BatchHandler).
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
	if err := s.store.project(ctx, items); err != nil {
		return fmt.Errorf("project %d events: %w", len(items), err)
	}
	s.settle(items)
	return nil
}

// settle acks what was projected and dead-letters what the database refused quietly
// (its statements changed nothing).
func (s *Service) settle(items []*projection) {
	for _, p := range items {
		if p.refused != nil {
			s.deadLetter(p.msg, p.refused)
			continue
		}
		if p.erased {
			s.log.Info("dropped the code of an erased person", "challenge_id", p.challenge.ChallengeID)
		} else if p.challenge != nil || p.superseded != nil {
			s.projected.Inc()
		}
		p.msg.Settle(platform.Ack())
	}
}

func (s *Service) deadLetter(d *platform.Delivery, reason error) {
	_, tenant, _ := events.SplitSubject(d.Subject())
	s.deadLettered.Inc()
	s.log.Warn("dead-letter event", "subject", d.Subject(), "reason", reason)
	d.Settle(platform.DeadLetter(tenant, "verifier: "+reason.Error()))
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
	case events.TypeChallenge:
		var e events.Challenge
		if err := events.DecodeEvent(m.Data(), &e); err != nil {
			return nil, err
		}
		return s.checkedChallenge(m, tenant, e)
	case events.TypeIssued:
		var e events.Issued
		if err := events.DecodeEvent(m.Data(), &e); err != nil {
			return nil, err
		}
		if !e.Legacy() {
			// This release's otp.issued: the audit's record; the code came on OTP_CHALLENGES.
			return &projection{msg: m, tenant: tenant}, nil
		}
		c, err := s.legacyChallenge(tenant, e)
		if err != nil {
			return nil, err
		}
		return s.checkedChallenge(m, tenant, c)
	case events.TypeSuperseded, events.TypeChallengeSuperseded:
		var e events.Superseded
		if err := events.DecodeEvent(m.Data(), &e); err != nil {
			return nil, err
		}
		if err := checkCommon(tenant, e.Tenant, e.ChallengeID, e.RequestID); err != nil {
			return nil, err
		}
		return &projection{msg: m, tenant: tenant, superseded: &e}, nil
	default:
		return nil, &events.ValidationError{Reason: events.ReasonInvalidField, Field: "subject",
			Detail: fmt.Sprintf("the verifier does not project %s", typ)}
	}
}

// checkedChallenge validates a code of a challenge and decides the risk rule it is
// subject to.
func (s *Service) checkedChallenge(m *platform.Delivery, tenant string, e events.Challenge) (*projection, error) {
	if err := checkChallenge(tenant, e); err != nil {
		return nil, err
	}
	p := &projection{msg: m, tenant: tenant, challenge: &e, traceParent: m.Headers().Get(events.HeaderTraceParent)}
	// Risk rule recipient_failures, decided once per challenge, on its first code. Test
	// recipients count too: a fixed code must not be cheaper to guess.
	if rf := s.cfg.Policies.For(tenant).Risk.RecipientFailures; rf.Failures > 0 && e.CodeSeq == 1 {
		p.failureRisk = failureRisk{failures: rf.Failures, window: rf.Window, maxAttempts: rf.MaxAttempts}
	}
	return p, nil
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
	// A subject hash is "id:" and 43 characters; a ring of a few keys.
	maxRecipientHashes = 16
	maxRecipientHash   = 128
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

func checkChallenge(tenant string, e events.Challenge) error {
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
	case len(e.SessionID) > maxSession:
		return field("session_id", "longer than %d bytes", maxSession)
	case len(e.Risk) > maxRiskLabels:
		return field("risk", "more than %d rules", maxRiskLabels)
	case len(e.RecipientHashes) > maxRecipientHashes:
		return field("recipient_hashes", "more than %d hashes", maxRecipientHashes)
	}
	for _, f := range []struct{ name, value string }{{"pepper_key_id", e.PepperKeyID}, {"session_id", e.SessionID}} {
		if err := text(f.name, f.value); err != nil {
			return err
		}
	}
	for _, h := range e.RecipientHashes {
		if h == "" || len(h) > maxRecipientHash {
			return field("recipient_hashes", "each must be 1 to %d bytes", maxRecipientHash)
		}
		if err := text("recipient_hashes", h); err != nil {
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
