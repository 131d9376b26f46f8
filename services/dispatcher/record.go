package dispatcher

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// A failed record is tried again after 100 ms, then at growing intervals up to 5 s, each
// attempt bounded by recordTimeout so that a database that stopped answering (rather than
// refusing connections) is tried again too.
const (
	recordRetryInitial = 100 * time.Millisecond
	recordRetryMax     = 5 * time.Second
	recordTimeout      = 10 * time.Second
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
		recorded := s.recordAll(batch)
		for _, j := range batch {
			if j.release != nil {
				j.release()
				j.release = nil
			}
			if j.claimed {
				s.done(keyOf(j.job))
			}
		}
		s.settle(ctx, recorded)
	}
}

// recordAll records the results of batch and returns the jobs it recorded. It retries with
// backoff until the database answers, however long that takes: the provider may have
// accepted these mails, and a job handed back before its send is recorded would be mailed
// again on redelivery. The jobs stay in progress meanwhile (and their send slots taken, so
// the process stops pulling). Only data the database refuses is not retried: the batch is
// then recorded job by job, and a job refused alone is dead-lettered.
func (s *Service) recordAll(batch []*job) []*job {
	b := backoff.NewExponentialBackOff(backoff.WithInitialInterval(recordRetryInitial),
		backoff.WithMaxInterval(recordRetryMax), backoff.WithMaxElapsedTime(0))
	err := backoff.RetryNotify(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), recordTimeout)
		defer cancel()
		err := s.record(ctx, batch)
		if _, refused := platform.RefusedByDatabase(err); refused {
			return backoff.Permanent(err)
		}
		return err
	}, b, func(err error, next time.Duration) {
		s.recordRetries.Inc()
		s.log.Warn("record deliveries failed; keeping the jobs and retrying", "jobs", len(batch), "retry_in", next, "err", err)
	})
	if err == nil {
		return batch
	}
	if len(batch) > 1 {
		var recorded []*job
		for _, j := range batch {
			recorded = append(recorded, s.recordAll([]*job{j})...)
		}
		return recorded
	}
	j := batch[0]
	s.log.Error("the database refused a delivery's record; dead-lettering the job", "challenge_id", j.job.ChallengeID,
		"code_seq", j.job.CodeSeq, "outcome", j.res.outcome.String(), "err", err)
	s.jobs.WithLabelValues("dead_lettered").Inc()
	j.d.Settle(platform.DeadLetter(j.job.Tenant, events.ConsumerDispatcher+": record refused: "+err.Error()))
	j.end()
	return nil
}

// record writes the results of the jobs this worker claimed in one transaction. A job
// whose transient failures used up its deliveries is recorded as failed. A job whose row
// another worker settled meanwhile takes that outcome instead of its own.
func (s *Service) record(ctx context.Context, jobs []*job) error {
	var done []completion
	var claimed []*job
	for _, j := range jobs {
		r := &j.res
		if r.outcome == outcomeRetry && s.last(j) {
			r.outcome, r.exhausted = outcomeFailed, true
			r.reason = events.DeliveryReasonExhausted + ": " + r.reason
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
		claimed = append(claimed, j)
	}
	settled, err := s.store.complete(ctx, done)
	if err != nil {
		return err
	}
	for i, row := range settled {
		// A row that already holds this job's outcome was completed by an earlier
		// attempt of this record whose answer was lost.
		if j := claimed[i]; row != nil && row.status != j.res.outcome.status() {
			s.log.Warn("delivery settled by another claim; reporting its outcome", "challenge_id", j.job.ChallengeID,
				"code_seq", j.job.CodeSeq, "ours", j.res.outcome.String(), "theirs", row.status)
			calls := j.res.calls
			j.res = replay(*row)
			j.res.calls = calls
			j.row.attempts = row.attempts
		}
	}
	return nil
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
			if s.last(j) {
				s.keep(j, s.keepDelay(j), "publish failed: "+err.Error())
				continue
			}
			s.finish(j, platform.Retry(2*time.Second))
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
		s.conclude(j)
	}
}

// conclude settles a recorded job's delivery with what the job came to.
func (s *Service) conclude(j *job) {
	switch r := j.res; r.outcome {
	case outcomeSent:
		s.finish(j, platform.Ack())
	case outcomeFailed, outcomeExpired:
		if r.exhausted {
			// The job's deliveries ran out before a final answer: park it with its
			// last error in OTP_DLQ for an operator to redrive.
			s.finish(j, platform.DeadLetter(j.job.Tenant, events.ConsumerDispatcher+": "+r.reason))
			return
		}
		s.finish(j, platform.Terminate(r.outcome.String()))
	case outcomeRetry:
		// Never on the last delivery: record made it a failure.
		s.finish(j, platform.Retry(s.retryDelay(j)))
	case outcomeAmbiguous:
		s.retry(j, min(2*time.Second, s.untilExpiry(j)), "ambiguous send: "+r.reason)
	default: // held
		s.retry(j, min(j.res.holdFor, s.untilExpiry(j)), "held by another claim")
	}
}

// retry hands j back to the broker for another delivery after d or, on its last delivery,
// keeps it to run again here.
func (s *Service) retry(j *job, d time.Duration, why string) {
	if s.last(j) {
		s.keep(j, d, why)
		return
	}
	s.finish(j, platform.Retry(d))
}

// finish settles j's delivery with o and ends its span.
func (s *Service) finish(j *job, o platform.Outcome) {
	j.d.Settle(o)
	j.end()
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
