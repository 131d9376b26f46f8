package dispatcher

import (
	"context"
	"fmt"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// job is one pulled dispatch job on its way through the stages: admitted and claimed
// here, sent in send.go, recorded and settled in record.go.
type job struct {
	d   *platform.Delivery
	job events.DispatchJob

	// The delivery row as found when claiming.
	row     deliveryRow
	claimed bool // this worker holds the lease
	// expiresAt is the code's expiry and sendBy the last instant a send may run, both
	// read against the database clock at the claim and kept on the local monotonic clock.
	expiresAt time.Time
	sendBy    time.Time

	res     result // what the job came to
	release func() // frees the send slot; set while a send's result is unrecorded
	keeps   int    // times kept on its last delivery (keep.go)

	// span is the job's "dispatch" span, from admission to settlement; ctx carries it.
	ctx  context.Context
	span trace.Span
}

// end ends the job's span with what the job came to.
func (j *job) end() {
	j.span.SetAttributes(attribute.String("otpflow.dispatch.outcome", j.res.outcome.String()))
	if p := j.res.provider; p != "" {
		j.span.SetAttributes(attribute.String("otpflow.provider", p))
	}
	switch j.res.outcome {
	case outcomeFailed, outcomeRetry:
		j.span.SetStatus(codes.Error, j.res.outcome.String())
	}
	j.span.End()
}

// expiryMargin: a code with less life left than this is not mailed (nobody could type
// it in time) and no mail goes out after its code expired, whatever the send takes.
const expiryMargin = 2 * time.Second

// admit decodes a pulled batch, takes a send slot per job (this is the backpressure: a
// full process stops pulling), claims all of them in one transaction and starts the sends.
// If the claim fails, the batch goes back to the consumer, which admits its jobs one by one.
func (s *Service) admit(ctx context.Context, batch []*platform.Delivery, results chan<- *job) error {
	var jobs []*job
	for _, d := range batch {
		sctx, span := d.StartSpan(ctx, s.cfg.Tracer, "dispatch")
		dj, tenant, err := s.open(d)
		if err != nil {
			span.SetStatus(codes.Error, "refused dispatch job")
			span.End()
			// A job that does not open under its routing fields was forged, edited or
			// written in an old format: nothing in it can be trusted, so nothing is sent.
			s.log.Error("refused dispatch job", "seq", d.Meta().Sequence, "err", err)
			s.jobs.WithLabelValues("dead_lettered").Inc()
			d.Settle(platform.DeadLetter(tenant, events.ConsumerDispatcher+": refused dispatch job: "+err.Error()))
			continue
		}
		span.SetAttributes(attribute.String("otpflow.tenant", dj.Tenant), attribute.String("otpflow.challenge_id", dj.ChallengeID),
			attribute.Int("otpflow.code_seq", dj.CodeSeq))
		jobs = append(jobs, &job{d: d, job: dj, ctx: sctx, span: span})
	}
	if len(jobs) == 0 {
		return nil
	}
	s.acquire(len(jobs))
	release := func() { <-s.slots }
	if err := s.claim(ctx, jobs); err != nil {
		if len(jobs) == 1 && s.last(jobs[0]) {
			if _, refused := platform.RefusedByDatabase(err); !refused {
				// The broker would not deliver it again: keep it and claim again here
				// once the database answers.
				release()
				s.log.Warn("claim failed on the job's last delivery; keeping it", "seq", jobs[0].d.Meta().Sequence, "err", err)
				s.keep(jobs[0], s.keepDelay(jobs[0]), "claim failed: "+err.Error())
				return nil
			}
		}
		s.log.Error("claim deliveries", "jobs", len(jobs), "err", err)
		for _, j := range jobs {
			release()
			j.span.SetStatus(codes.Error, "claim failed")
			j.span.End()
		}
		return fmt.Errorf("claim deliveries: %w", err)
	}
	for _, j := range jobs {
		s.start(ctx, j, release, results)
	}
	return nil
}

// start takes a claimed job on from its claim: to the send, or, with nothing to send
// (held, settled before, given up, expired), straight to the record stage. It owns the
// job's send slot and frees it with release.
func (s *Service) start(ctx context.Context, j *job, release func(), results chan<- *job) {
	switch {
	case !j.claimed || j.res.outcome != 0:
		release()
		results <- j
	case time.Until(j.sendBy) <= 0:
		j.res = result{outcome: outcomeExpired}
		release()
		results <- j
	default:
		// The slot is held until the result is recorded, so at most Concurrency
		// mails per process are ever sent and not yet recorded: the bound of
		// the double-send window when a process dies.
		j.release = release
		s.inflight.Add(1)
		go func() {
			defer s.inflight.Done()
			j.res = s.send(ctx, j)
			results <- j
		}()
	}
}

// open decodes a pulled job and unseals it. The job must name its subject's tenant outside
// and inside the seal.
func (s *Service) open(d *platform.Delivery) (events.DispatchJob, string, error) {
	_, tenant, err := events.SplitSubject(d.Subject())
	if err != nil {
		return events.DispatchJob{}, "", err
	}
	sealed, err := events.DecodeSealedDispatch(d.Data())
	if err != nil {
		return events.DispatchJob{}, tenant, err
	}
	if sealed.Tenant != tenant {
		return events.DispatchJob{}, tenant, fmt.Errorf("job tenant %q does not match its subject", sealed.Tenant)
	}
	dj, err := s.cfg.Sealer.OpenJob(sealed)
	if err != nil {
		return events.DispatchJob{}, tenant, err
	}
	return dj, tenant, nil
}

// jobRecipient is the subject hash of a dispatch job's recipient, for its dead letter's
// header: known only once the job opens (a forged job names nobody).
func (s *Service) jobRecipient(tenant string, data []byte) string {
	sealed, err := events.DecodeSealedDispatch(data)
	if err != nil || sealed.Tenant != tenant {
		return ""
	}
	job, err := s.cfg.Sealer.OpenJob(sealed)
	if err != nil {
		return ""
	}
	return s.cfg.Subjects.Subject(tenant, job.Recipient)
}

// acquire takes n send slots, waiting while every slot is busy with slow providers; the
// consumer keeps the waiting jobs in progress meanwhile.
func (s *Service) acquire(n int) {
	for range n {
		s.slots <- struct{}{}
	}
}

// claim takes a lease on each job of the batch that nobody else holds and that has not
// been settled, all in one transaction.
//
// A job on its last delivery (the broker will not deliver it again) that another claim
// still holds waits here for that lease (record.go keeps it) until its code expires; then
// it takes the row over as expired and is given up: nothing may be sent after expiry, so
// the takeover cannot cost a mail, and the holder, if it ever completes, finds the row
// settled and reports the same outcome.
func (s *Service) claim(ctx context.Context, jobs []*job) error {
	seen := map[deliveryKey]bool{}
	var first []*job
	var keys []deliveryKey
	for _, j := range jobs {
		j.claimed, j.row, j.res = false, deliveryRow{}, result{}
		k := keyOf(j.job)
		if seen[k] {
			// The same job twice in one pull: handle it again once the first settles.
			j.res = result{outcome: outcomeHeld, holdFor: time.Second}
			continue
		}
		seen[k] = true
		first = append(first, j)
		keys = append(keys, k)
	}
	err := s.store.claim(ctx, keys, s.cfg.Lease, func(local, now time.Time, rows []deliveryRow) []claim {
		// Leases and expiry run on the database clock, shared by every process; the
		// deadlines are kept on this process's monotonic clock, from a local instant
		// taken first, so they err early.
		for _, j := range jobs {
			j.expiresAt = local.Add(j.job.ExpiresAt.Sub(now))
			j.sendBy = local.Add(min(j.job.ExpiresAt.Add(-expiryMargin).Sub(now), s.cfg.Lease*3/4))
		}
		var claims []claim
		for i, j := range first {
			r := rows[i]
			j.row = r
			switch {
			case !r.exists:
				if !s.take(keyOf(j.job)) {
					j.res = result{outcome: outcomeHeld, holdFor: time.Second}
					continue
				}
				claims = append(claims, claim{job: j.job, fresh: true})
				j.claimed, j.row.attempts = true, 1
			case r.status != statusSending:
				j.res = replay(r) // settled before: report it again, send nothing
			case r.leaseUntil.After(now) && s.last(j) && !now.Before(j.job.ExpiresAt):
				if !s.take(keyOf(j.job)) {
					j.res = result{outcome: outcomeHeld, holdFor: time.Second}
					continue
				}
				claims = append(claims, claim{job: j.job})
				j.claimed, j.row.attempts = true, r.attempts+1
				j.res = result{outcome: outcomeExpired, exhausted: true,
					reason: events.DeliveryReasonHeldPastExpiry + ": another claim held the job until its code expired"}
			case r.leaseUntil.After(now):
				j.res = result{outcome: outcomeHeld, holdFor: r.leaseUntil.Sub(now) + 100*time.Millisecond}
			case !s.take(keyOf(j.job)):
				// This process sent it and is still recording the result (the database
				// was away longer than the lease): the mail went out, send nothing.
				j.res = result{outcome: outcomeHeld, holdFor: time.Second}
			default:
				claims = append(claims, claim{job: j.job})
				j.claimed, j.row.attempts = true, r.attempts+1
			}
		}
		return claims
	})
	if err != nil {
		for _, j := range first {
			if j.claimed {
				s.done(keyOf(j.job))
				j.claimed = false
			}
		}
	}
	return err
}
