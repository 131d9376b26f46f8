package dispatcher

import (
	"context"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"go.opentelemetry.io/otel/codes"
)

// The last delivery. JetStream does not deliver a job again after its consumer's
// MaxDeliver, so on the last delivery nothing may be handed back with platform.Retry:
// the job would vanish without an outcome. What would go back to the broker there is
// kept here instead (unsettled, so the consumer keeps it in progress) and run again from
// its claim after the same delay: a job held by another claim waits for that lease, an
// ambiguous send gets its one re-send, a claim or an event publish that failed is tried
// again. Transient send failures are the exception: they give the job up
// (delivery_failed, and the DLQ).
//
// Beside it, the jobs this process holds ("in hand", from claim to record): a job in hand
// is never claimed a second time here, even after its lease lapsed, because its send may
// have succeeded and its record still be on its way (record.go retries it until the
// database answers).

// last reports whether j is on its last delivery.
func (s *Service) last(j *job) bool {
	return j.d.Meta().NumDelivered >= uint64(s.cfg.MaxDeliver)
}

// take puts k in hand; false if it already is.
func (s *Service) take(k deliveryKey) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inHand[k] {
		return false
	}
	s.inHand[k] = true
	return true
}

// done lets go of k once its result is recorded.
func (s *Service) done(k deliveryKey) {
	s.mu.Lock()
	delete(s.inHand, k)
	s.mu.Unlock()
}

// keep runs j again from its claim after d, because its delivery is its last. Once the
// dispatcher stops, a job it can no longer finish is dead-lettered with why instead.
func (s *Service) keep(j *job, d time.Duration, why string) {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		s.abandon(j, why)
		return
	}
	j.keeps++
	s.inflight.Add(1) // under mu, so never after stopKeeping let Run wait
	s.kept[j] = time.AfterFunc(d, func() {
		s.mu.Lock()
		_, ok := s.kept[j]
		delete(s.kept, j)
		s.mu.Unlock()
		if ok {
			s.rerun(j)
			s.inflight.Done()
		}
	})
	s.mu.Unlock()
	s.jobs.WithLabelValues("kept").Inc()
}

// keepDelay is the wait before a kept job's next try after a failed claim or publish:
// 1 s, doubling up to 30 s.
func (s *Service) keepDelay(j *job) time.Duration {
	return platform.RetryDelay(uint64(j.keeps+1), 30*time.Second)
}

// rerun takes a kept job on again: a recorded job whose event could not be published
// publishes it and settles; any other is claimed again and taken on as admit does.
func (s *Service) rerun(j *job) {
	ctx := context.Background()
	switch j.res.outcome {
	case outcomeSent, outcomeFailed, outcomeExpired:
		s.settle(ctx, []*job{j})
		return
	}
	s.acquire(1)
	release := func() { <-s.slots }
	if err := s.claim(ctx, []*job{j}); err != nil {
		release()
		if _, refused := platform.RefusedByDatabase(err); refused {
			s.abandon(j, "claim refused: "+err.Error())
			return
		}
		s.log.Warn("claim of a kept job failed; trying again", "seq", j.d.Meta().Sequence, "err", err)
		s.keep(j, s.keepDelay(j), "claim failed: "+err.Error())
		return
	}
	s.start(ctx, j, release, s.results)
}

// stopKeeping is the start of shutdown: jobs waiting to run again are dead-lettered, as is
// any job kept from now on, so that none is left to a broker that will not deliver it again.
func (s *Service) stopKeeping() {
	s.mu.Lock()
	s.stopping = true
	var left []*job
	for j, t := range s.kept {
		if t.Stop() {
			left = append(left, j)
			delete(s.kept, j)
		}
	}
	s.mu.Unlock()
	for _, j := range left {
		s.abandon(j, "waiting to run again on its last delivery")
		s.inflight.Done()
	}
}

// abandon dead-letters a job on its last delivery that this process cannot finish (a
// dispatch job is not redriven: the app asks again). A job handed over again from OTP_ADVISORIES
// (readExhausted) that this process stops before finishing is handed back instead: its
// advisory comes back to a dispatcher.
func (s *Service) abandon(j *job, why string) {
	s.mu.Lock()
	stopping := s.stopping
	s.mu.Unlock()
	if stopping && j.d.HandedOverAgain() {
		s.log.Warn("job handed back to its advisory", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "why", events.Reason(why, 200))
		j.span.End()
		j.d.Settle(platform.Retry(time.Second))
		return
	}
	s.log.Error("job abandoned on its last delivery", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "why", events.Reason(why, 200))
	s.jobs.WithLabelValues("dead_lettered").Inc()
	j.span.SetStatus(codes.Error, "abandoned")
	j.span.End()
	j.d.Settle(platform.DeadLetter(j.job.Tenant, events.ConsumerDispatcher+": abandoned on its last delivery: "+why))
}
