package verifier

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// Verify checks code for (tenant, request_id) in a transaction that holds the
// challenge's row lock, so concurrent attempts are counted exactly; verifies that arrive
// together share the transaction (group.go). A call over the
// tenant's or the client IP's verify limit is answered rate_limited before the challenge
// is read, so it costs no attempt. The projection's lag does not show (fence.go): a
// request the projection does not know yet waits until the projection has caught up with
// the stream (read-your-writes), at most FenceWait and at most MaxFenceWaits at once,
// then answers; a challenge whose supersession is on the stream answers superseded, also
// before the projection has applied it.
func (s *Service) Verify(ctx context.Context, tenant string, req events.VerifyRequest) (events.VerifyReply, error) {
	ls, err := s.limits(tenant, req.Context.IP)
	if err != nil {
		return events.VerifyReply{}, fmt.Errorf("verify limits: %w", err)
	}
	reply, err := s.verifyOnce(ctx, &verifyCall{ctx: ctx, tenant: tenant, req: req, limits: ls})
	if !errors.Is(err, errNotProjected) {
		return reply, err
	}
	select {
	case s.fenceSlots <- struct{}{}:
		ferr := s.fence(ctx, tenant)
		<-s.fenceSlots
		if ferr != nil {
			s.log.Warn("read-your-writes fence", "tenant", tenant, "err", ferr)
		}
	default:
		s.fenceSkipped.Inc()
	}
	return s.verifyOnce(ctx, &verifyCall{ctx: ctx, tenant: tenant, req: req, final: true})
}

// verifyOnce runs one call in a verify group (group.go), which counts its limits, runs the
// verify rule in the store's transaction and publishes the events it decided once they
// are committed.
func (s *Service) verifyOnce(ctx context.Context, c *verifyCall) (events.VerifyReply, error) {
	s.groups.do(c)
	if c.err != nil {
		return events.VerifyReply{}, c.err
	}
	// The verify's span continues the app's trace; it links to the issuance's, in the
	// trace of the request that asked for the code.
	if sc := platform.ParseTraceParent(c.issuance); sc.IsValid() {
		trace.SpanFromContext(ctx).AddLink(trace.Link{SpanContext: sc,
			Attributes: []attribute.KeyValue{attribute.String("otpflow.link", "issuance")}})
	}
	return c.reply, nil
}

// decide is the verify rule for one presented code, at now on the database clock, against
// the challenge c (nil if none is projected): its status, the recipient's failure cap, a
// constant-time comparison with each of the recent live codes, the session binding and
// the attempt limit. Every outcome but a match is a failure the caller learns and an
// otp.verify_failed event; a match is otp.verified, the last allowed miss also otp.locked.
func (s *Service) decide(tenant string, req events.VerifyRequest, now time.Time, c *challenge, recent func(n int) ([]code, error)) (decision, error) {
	found := c != nil
	if !found {
		c = &challenge{} // the event of a not_found names no challenge
	}
	attempts := c.attempts
	reason := ""
	failed := func(st events.VerifyStatus, remaining int) (decision, error) {
		m, err := s.event(events.TypeVerifyFailed, tenant, fmt.Sprintf("verify_failed:%s:%s:%s", tenant, req.RequestID, newID()), c.id,
			events.VerifyFailed{ChallengeID: c.id, Tenant: tenant, RequestID: req.RequestID, Status: st,
				Attempts: attempts, AttemptsRemaining: remaining, FailedAt: now, Test: c.test, Reason: reason})
		return decision{reply: events.VerifyReply{Status: st, AttemptsRemaining: remaining, Reason: reason},
			events: []*nats.Msg{m}}, err
	}
	switch {
	case !found:
		return failed(events.StatusNotFound, 0)
	case c.status == statusVerified:
		return failed(events.StatusAlreadyUsed, 0)
	case c.status == statusLocked:
		return failed(events.StatusLocked, 0)
	case c.status == statusSuperseded:
		return failed(events.StatusSuperseded, 0)
	}

	p := s.cfg.Policies.For(tenant)
	// Failed verifications for this recipient across challenges within the hour (the
	// store holds their row lock: exact). Test recipients count like every address: their
	// code is fixed, so a cap is all that stands between a guesser cycling request ids
	// and the code.
	failures := c.failures.Trim(now.Add(-time.Hour))
	if limit := p.RateLimits.RecipientFailuresPerHour; limit > 0 && len(failures) >= limit {
		reason = "recipient_failures"
		return failed(events.StatusLocked, 0)
	}

	codes, err := recent(p.RecentCodes)
	if err != nil {
		return decision{}, err
	}
	matched := 0
	live := 0
	for _, k := range codes {
		if !now.Before(k.expires) {
			continue
		}
		live++
		// Every live code is compared, match or not, so timing does not tell which matched.
		ok, err := s.cfg.Pepper.Equal(k.keyID, c.id, req.Code, k.mac)
		if err != nil {
			return decision{}, err
		}
		if ok && matched == 0 {
			matched = k.seq
		}
	}
	if live == 0 {
		return failed(events.StatusExpired, 0)
	}
	if c.sessionID != "" && req.Context.SessionID != c.sessionID {
		matched = 0 // a code bound to a session verifies only with it
	}
	attempts++
	if matched > 0 {
		m, err := s.event(events.TypeVerified, tenant, "verified:"+c.id, c.id, events.Verified{
			ChallengeID: c.id, Tenant: tenant, RequestID: req.RequestID, CodeSeq: matched,
			Attempts: attempts, VerifiedAt: now, Test: c.test})
		return decision{reply: events.VerifyReply{Status: events.StatusVerified},
			status: statusVerified, attempts: attempts, events: []*nats.Msg{m}}, err
	}
	d, err := failed(events.StatusInvalidCode, max(c.maxAttempts-attempts, 0))
	d.status, d.attempts, d.failures = statusActive, attempts, failures.Add(now)
	if err != nil || attempts < c.maxAttempts {
		return d, err
	}
	d.status = statusLocked
	m, err := s.event(events.TypeLocked, tenant, "locked:"+c.id, c.id, events.Locked{
		ChallengeID: c.id, Tenant: tenant, RequestID: req.RequestID, Attempts: attempts, LockedAt: now, Test: c.test})
	d.events = append(d.events, m)
	return d, err
}

// event builds an event; its body carries the decision's (database) time, its
// CloudEvents time the process clock, when the message was made.
func (s *Service) event(typ events.Type, tenant, id, challengeID string, v any) (*nats.Msg, error) {
	return events.NewMsg(typ, tenant, id, challengeID, v, events.Envelope{Source: "otpflow/verifier", Time: s.now()})
}
