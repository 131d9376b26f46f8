package dispatcher

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// recordLoop records results in batches of whatever is ready, until results is closed.
func (s *Service) recordLoop(results <-chan *job) {
	ctx := context.Background()
	for j := range results {
		batch := []*job{j}
	more:
		for len(batch) < 200 {
			select {
			case j, ok := <-results:
				if !ok {
					break more
				}
				batch = append(batch, j)
			default:
				break more
			}
		}
		err := s.record(ctx, batch)
		for _, j := range batch {
			if j.release != nil {
				j.release()
			}
		}
		if err != nil {
			// Mails that went out may go out again on redelivery: with the kill of a
			// process, the one window in which a code can be mailed twice.
			s.log.Error("record deliveries", "jobs", len(batch), "err", err)
			for _, j := range batch {
				j.d.Settle(platform.Retry(platform.RetryDelay(j.d.Meta().NumDelivered, 30*time.Second)))
				j.end()
			}
			continue
		}
		s.settle(ctx, batch)
		for _, j := range batch {
			j.end()
		}
	}
}

// record writes the results of the jobs this worker claimed in one transaction. A job
// whose transient failures used up its deliveries is recorded as failed.
func (s *Service) record(ctx context.Context, jobs []*job) error {
	var done []completion
	for _, j := range jobs {
		r := &j.res
		if r.outcome == outcomeRetry && j.d.Meta().NumDelivered >= uint64(s.cfg.MaxDeliver) {
			r.outcome, r.exhausted = outcomeFailed, true
			r.reason = "deliveries exhausted: " + r.reason
		}
		if !j.claimed {
			continue
		}
		c := completion{key: keyOf(j.job), lastError: events.Reason(r.reason, 500)}
		switch r.outcome {
		case outcomeSent, outcomeFailed, outcomeExpired:
			c.status, c.provider, c.providerMsg, c.confirmed = r.outcome.status(), r.provider, r.providerMsg, !r.unconfirmed
		case outcomeAmbiguous:
			c.ambiguous = true
		}
		done = append(done, c)
	}
	return s.store.complete(ctx, done)
}

// event builds the event that reports a settled job; the id is the same every time the
// job is reported, so a re-report after a crash is dropped by the stream.
func (s *Service) event(j *job) *nats.Msg {
	dj, r, now := j.job, j.res, s.now().UTC()
	var typ events.Type
	var v any
	switch r.outcome {
	case outcomeSent:
		typ, v = events.TypeDelivered, events.Delivered{ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID,
			CodeSeq: dj.CodeSeq, Provider: r.provider, ProviderMessageID: r.providerMsg, Attempts: j.row.attempts,
			Unconfirmed: r.unconfirmed, ProviderAttempts: r.calls, DeliveredAt: now}
	case outcomeFailed:
		typ, v = events.TypeDeliveryFailed, events.DeliveryFailed{ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID,
			CodeSeq: dj.CodeSeq, Provider: r.provider, Reason: events.Reason(r.reason, 500), Permanent: !r.exhausted,
			Attempts: j.row.attempts, FailedAt: now, ProviderAttempts: r.calls}
	case outcomeExpired:
		typ, v = events.TypeDispatchExpired, events.DispatchExpired{ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID,
			CodeSeq: dj.CodeSeq, Attempts: j.row.attempts, ExpiresAt: dj.ExpiresAt, ExpiredAt: now}
	default:
		return nil
	}
	id := fmt.Sprintf("%s:%s:%d", typ[len("otp."):], dj.ChallengeID, dj.CodeSeq)
	tp := platform.TraceParent(j.ctx) // the job's span; without a tracer, the job's own
	if tp == "" {
		tp = j.d.Headers().Get(events.HeaderTraceParent)
	}
	env := events.Envelope{Source: "otpflow/dispatcher", TraceParent: tp}
	m, err := events.NewMsg(typ, dj.Tenant, id, dj.ChallengeID, v, env)
	if err != nil {
		s.log.Error("encode event", "type", typ, "err", err)
		return nil
	}
	return m
}

// settle publishes the events and then settles each job's delivery. A job whose event
// could not be published is redelivered; its row makes the retry send nothing.
func (s *Service) settle(ctx context.Context, jobs []*job) {
	var msgs []*nats.Msg
	for _, j := range jobs {
		if m := s.event(j); m != nil {
			msgs = append(msgs, m)
		}
	}
	if err := platform.PublishAll(ctx, s.js, msgs); err != nil {
		s.log.Warn("publish delivery events; jobs will be redelivered", "err", err)
		for _, j := range jobs {
			j.d.Settle(platform.Retry(2 * time.Second))
		}
		return
	}
	for _, j := range jobs {
		r := j.res
		s.jobs.WithLabelValues(r.outcome.String()).Inc()
		switch r.outcome {
		case outcomeSent:
			s.delivered.Observe(time.Since(j.job.IssuedAt).Seconds())
			s.log.Info("delivered", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "provider", r.provider, "unconfirmed", r.unconfirmed)
		case outcomeFailed, outcomeExpired:
			s.log.Info("dispatch settled", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "result", r.outcome.String(), "reason", events.Reason(r.reason, 200))
		}
		j.d.Settle(s.verdict(j))
	}
}

// verdict is what becomes of a recorded job's delivery.
func (s *Service) verdict(j *job) platform.Outcome {
	switch r := j.res; r.outcome {
	case outcomeSent:
		return platform.Ack()
	case outcomeFailed, outcomeExpired:
		if r.exhausted {
			// Transient failures used up the deliveries: park the job with its last
			// error in OTP_DLQ for an operator to redrive.
			return platform.DeadLetter(j.job.Tenant, r.reason)
		}
		return platform.Terminate(r.outcome.String())
	case outcomeRetry:
		return platform.Retry(s.retryDelay(j))
	case outcomeAmbiguous:
		return platform.Retry(min(2*time.Second, s.untilExpiry(j)))
	default: // held
		return platform.Retry(min(j.res.holdFor, s.untilExpiry(j)))
	}
}

// retryDelay is the redelivery delay after a transient failure: exponential in the
// delivery count (1s, 2s, 4s, ... capped at 30s) with ±20% jitter, and never past the
// code's expiry: the delivery at expiry reports dispatch_expired instead of sending.
func (s *Service) retryDelay(j *job) time.Duration {
	d := platform.RetryDelay(j.d.Meta().NumDelivered, 30*time.Second)
	d = time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
	return min(d, s.untilExpiry(j))
}

func (s *Service) untilExpiry(j *job) time.Duration {
	return max(time.Until(j.expiresAt), 0) + 100*time.Millisecond
}
