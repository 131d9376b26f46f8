package verifier

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/prometheus/client_golang/prometheus"
)

// Verifies are committed in groups. A verify queues its call; a caller that finds one
// of the process's VerifyTransactions slots free takes every call queued (up to
// VerifyGroupSize) and runs them as one group: one statement for their verify limits,
// one transaction for their rules, one publish. Nothing waits for a group to fill: a
// verify that arrives while the slots are busy joins the next group, so at low load a
// group is one verify and under load a verify waits for at most the transaction ahead of
// it, while the database commits once per group instead of three times per verify.

// Defaults of the verify groups.
const (
	defaultVerifyTransactions = 4
	defaultVerifyGroupSize    = 64
	// verifyGroupTimeout bounds one group's statements, transaction and publish.
	verifyGroupTimeout = 30 * time.Second
)

// verifyCall is one verify waiting for its group.
type verifyCall struct {
	ctx    context.Context
	tenant string
	req    events.VerifyRequest
	// limits are counted before the verify (the call's first pass only).
	limits []limit
	// final answers a request the projection does not know (not_found).
	final bool
	// sup are the supersessions of the call's request on the stream that the projection
	// may not have applied, read when its group began (fence.go); supErr, when that read
	// failed: the call may then not succeed.
	sup    superseded
	supErr error
	// ahead: the call was answered superseded from sup.
	ahead bool

	reply events.VerifyReply
	// issuance is the traceparent of the code's otp.challenge.
	issuance string
	err      error
	done     chan struct{}
}

// verifyGroups is the queue of verify calls and the slots of the transactions that run
// them.
type verifyGroups struct {
	mu    sync.Mutex
	queue []*verifyCall
	slots chan struct{}
	max   int
	// run answers a group's calls, closing each one's done, and returns the outbox
	// entries of the events they decided, committed and still to publish.
	run func([]*verifyCall) []outbox.Entry
	// publish sends a group's events; at most cap(publishSlots) at once: past that, the
	// events are left to the outbox relay, and a slow stream never holds a verify.
	publish      func([]outbox.Entry)
	publishSlots chan struct{}
	publishing   sync.WaitGroup
	size         prometheus.Histogram
	leftToRelay  prometheus.Counter
}

func newVerifyGroups(transactions, size int, run func([]*verifyCall) []outbox.Entry, publish func([]outbox.Entry)) *verifyGroups {
	return &verifyGroups{slots: make(chan struct{}, transactions), max: size, run: run, publish: publish,
		publishSlots: make(chan struct{}, 2*transactions),
		size: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "otpflow_verifier_verify_group_size",
			Help:    "Verify calls committed together in one transaction.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128},
		}),
		leftToRelay: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_verify_events_left_to_relay_total",
			Help: "Verify groups whose events were left to the outbox relay, the publishes in flight being at their bound.",
		})}
}

// do queues c and returns once its group has answered it. The caller runs groups itself
// while a slot is free and calls are queued, its own or others'.
func (g *verifyGroups) do(c *verifyCall) {
	c.done = make(chan struct{})
	g.mu.Lock()
	g.queue = append(g.queue, c)
	g.mu.Unlock()
	for {
		select {
		case <-c.done:
			return
		case g.slots <- struct{}{}:
		}
		g.mu.Lock()
		n := min(len(g.queue), g.max)
		group := make([]*verifyCall, n)
		copy(group, g.queue)
		g.queue = append(g.queue[:0:0], g.queue[n:]...)
		g.mu.Unlock()
		if n == 0 {
			// c is in a group another caller runs.
			<-g.slots
			<-c.done
			return
		}
		g.size.Observe(float64(n))
		entries := g.run(group)
		<-g.slots
		if len(entries) == 0 {
			continue
		}
		select {
		case g.publishSlots <- struct{}{}:
			g.publishing.Go(func() {
				defer func() { <-g.publishSlots }()
				g.publish(entries)
			})
		default:
			g.leftToRelay.Inc()
		}
	}
}

// wait returns once every publish begun so far has ended (events left to the relay are
// not waited for).
func (g *verifyGroups) wait() { g.publishing.Wait() }

// queued is how many calls wait for a group (tests read it).
func (g *verifyGroups) queued() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.queue)
}

// runGroup answers a group of calls: it counts their verify limits in one statement,
// runs the verifies within the limits in one transaction (store.verifyGroup), answers
// every call, and returns the outbox entries of the events they decided, committed by
// then: an app has its answer without waiting for the stream, and the events follow at
// once (or from the outbox relay, should the process die first).
func (s *Service) runGroup(calls []*verifyCall) []outbox.Entry {
	defer func() {
		for _, c := range calls {
			close(c.done)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), verifyGroupTimeout)
	defer cancel()
	live := calls[:0:0]
	for _, c := range calls {
		if err := c.ctx.Err(); err != nil {
			c.err = err // the caller gave up while it waited
			continue
		}
		live = append(live, c)
	}

	// The supersessions the projection may not have applied yet are read from the stream
	// while the limits are counted and the challenges locked and read; the rule of an
	// active challenge waits for them (holding the group's row locks, at most
	// supersessionRead). What is at or below a floor of the projection is in the rows the
	// transaction reads: the projection acknowledges a supersession once it has committed
	// it, and writes it under the challenge's row lock, which the transaction holds when
	// the rule runs; so the floor read before the group began, and any newer one another
	// group prunes the shared index with, left nothing out of what the rule sees.
	floor := s.floor.known()
	rctx, rcancel := context.WithTimeout(ctx, supersessionRead)
	supersessionsRead := make(chan struct{})
	go func() {
		defer close(supersessionsRead)
		s.readSupersessions(rctx, live, floor)
	}()
	// A group that ends early ends its read, and nothing writes to its calls after.
	defer func() { rcancel(); <-supersessionsRead }()

	// Verify limits: a call over one is answered rate_limited before its challenge is
	// read, so it costs no attempt.
	var counted []*verifyCall
	var keys [][][]byte
	for _, c := range live {
		if len(c.limits) > 0 {
			ks := make([][]byte, len(c.limits))
			for i, l := range c.limits {
				ks[i] = l.key
			}
			counted, keys = append(counted, c), append(keys, ks)
		}
	}
	limited := map[*verifyCall]bool{}
	if len(counted) > 0 {
		counts, err := s.store.countLimits(ctx, keys)
		for i, c := range counted {
			if err != nil {
				c.err, limited[c] = fmt.Errorf("verify limits: %w", err), true
				continue
			}
			if wait, reason := judgeLimits(c.limits, counts[i]); wait > 0 {
				c.reply = events.VerifyReply{Status: events.StatusRateLimited, Reason: reason, RetryAfterSeconds: wait}
				limited[c] = true
			}
		}
	}

	var items []*verifyItem
	var owners []*verifyCall
	for _, c := range live {
		if !limited[c] {
			items, owners = append(items, s.item(c, supersessionsRead)), append(owners, c)
		}
	}
	if len(items) == 0 {
		return nil
	}
	// A group of several waits for a row lock at most lockTimeout; a verify alone waits
	// as the old single verify did, bounded by the group's deadline.
	lockTimeout := time.Duration(0)
	if len(items) > 1 {
		lockTimeout = s.cfg.lockTimeout
	}
	entries, err := s.store.verifyGroup(ctx, items, lockTimeout)
	switch {
	case err == nil:
		for i, it := range items {
			s.answer(owners[i], it)
		}
		return entries
	case len(items) > 1 && oneCallsDoing(err):
		// Nothing of the group was written, and the failure may be one call's doing (a
		// row held elsewhere past the lock timeout, a row the database refuses): each
		// call alone, within one more deadline for them all, so the others are still
		// answered.
		s.log.Warn("verify group failed; verifying its calls one by one", "calls", len(items), "err", err)
		ctx, cancel := context.WithTimeout(context.Background(), verifyGroupTimeout)
		defer cancel()
		entries = nil
		for i, it := range items {
			e, err := s.store.verifyGroup(ctx, []*verifyItem{it}, s.cfg.lockTimeout)
			if err != nil {
				owners[i].err = err
				continue
			}
			s.answer(owners[i], it)
			entries = append(entries, e...)
		}
		return entries
	default:
		// Failed, or its COMMIT's outcome is unknown: running the calls again could
		// count their attempts twice. The callers retry.
		for _, c := range owners {
			c.err = err
		}
		return nil
	}
}

// oneCallsDoing tells a group's failure that may come from one of its calls, before the
// group's commit: a row lock held elsewhere past the lock timeout (55P03), data the
// database refuses (classes 22, 23, 54) or an exception a trigger raised (class P0). A
// lost connection, a deadline or a failed commit is every call's, and splitting the group
// would only stretch the wait or, after a commit of unknown outcome, count its attempts
// twice.
func oneCallsDoing(err error) bool {
	var before *errBeforeCommit
	var pgErr *pgconn.PgError
	if !errors.As(err, &before) || !errors.As(err, &pgErr) {
		return false
	}
	if _, refused := platform.RefusedByDatabase(err); refused {
		return true
	}
	return pgErr.Code == "55P03" || strings.HasPrefix(pgErr.Code, "P0")
}

// item is the store's view of a call: the verify rule, run in the group's transaction;
// for an active challenge, once the supersessions are read (closed read).
func (s *Service) item(c *verifyCall, read <-chan struct{}) *verifyItem {
	return &verifyItem{tenant: c.tenant, requestID: c.req.RequestID, answerMissing: c.final,
		recent: s.cfg.Policies.For(c.tenant).RecentCodes,
		rule: func(now time.Time, ch *challenge, recent func(n int) ([]code, error)) (decision, error) {
			c.issuance = ""
			if ch != nil {
				c.issuance = ch.traceParent
			}
			c.ahead = false
			var unknown error // whether a supersession closes the challenge
			if ch != nil && ch.status == statusActive {
				// Only an active challenge can be superseded, or verify.
				<-read
				c.ahead, unknown = c.sup.closes(c.req.RequestID, ch.id), c.supErr
			}
			if c.ahead {
				// Superseded on the stream, not yet in the projection.
				v := *ch
				v.status, ch = statusSuperseded, &v
			}
			d, err := s.decide(c.tenant, c.req, now, ch, recent)
			if err == nil && d.reply.Status == events.StatusVerified && (unknown != nil || ch == nil || ch.status != statusActive) {
				if unknown == nil {
					unknown = errors.New("verified a challenge that is not active")
				}
				// Whether a supersession closes the challenge is not known: nothing is
				// written, and the call fails.
				return decision{}, unknown
			}
			// What the verify decided is published in its trace (the caller's).
			if tp := platform.TraceParent(c.ctx); tp != "" {
				for _, m := range d.events {
					if m != nil {
						m.Header.Set(events.HeaderTraceParent, tp)
					}
				}
			}
			c.reply = d.reply
			return d, err
		}}
}

// readSupersessions gives each call the supersessions of its request that the
// projection may not have applied past floor (fence.go), the tenants read at once, within
// ctx (supersessionRead).
func (s *Service) readSupersessions(ctx context.Context, calls []*verifyCall, floor uint64) {
	requests := map[string][]string{}
	for _, c := range calls {
		requests[c.tenant] = append(requests[c.tenant], c.req.RequestID)
	}
	var wg sync.WaitGroup
	for tenant, ids := range requests {
		wg.Go(func() {
			sup, err := s.supersessions(ctx, tenant, ids, floor)
			if err != nil {
				if !errors.Is(err, context.Canceled) { // not a group that ended first
					s.log.Warn("supersessions on the stream; successful verifies of the tenant fail", "tenant", tenant, "err", err)
				}
				err = fmt.Errorf("%w: %w", errSupersessionsUnknown, err)
			}
			for _, c := range calls {
				if c.tenant == tenant {
					c.sup, c.supErr = sup, err
				}
			}
		})
	}
	wg.Wait()
}

// answer gives a call its item's outcome.
func (s *Service) answer(c *verifyCall, it *verifyItem) {
	switch {
	case it.err != nil:
		c.err = it.err
	case it.notProjected:
		c.err = errNotProjected
	case c.ahead:
		s.supersededAhead.Inc()
	}
}

// publishGroup sends a group's committed events; the outbox relay retries what fails.
func (s *Service) publishGroup(entries []outbox.Entry) {
	ctx, cancel := context.WithTimeout(context.Background(), verifyGroupTimeout)
	defer cancel()
	if err := s.outbox.Publish(ctx, entries); err != nil {
		s.log.Warn("publish verify events; the outbox relay will retry", "err", err)
	}
}
