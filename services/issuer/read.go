package issuer

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"golang.org/x/sync/errgroup"
)

// The issuer reads OTP_REQUESTS through one durable, or, when tenants have request
// streams of their own, through one per tenant (events.IssuerConsumers), each read by
// its own loop with its own batches and transactions. A tenant that floods fills only
// its own durable's backlog: every other tenant's requests are read beside it, not
// behind it.
//
// Which durables those are is what OTP_REQUESTS sources, read again every
// ConsumersCheckEvery, so provisioning a tenant, or turning tenant streams on or off,
// needs no restart. While provisioning moves the issuer from one set of durables to the
// next, the issuer reads every durable of either set that exists: the old ones until
// provisioning deletes them, the new ones once it has made them.

// boundConsumer is a durable of the issuer and its handle.
type boundConsumer struct {
	cc   jetstream.ConsumerConfig
	cons jetstream.Consumer
}

// bindExisting binds each durable of want that exists, and the issuer's other durables
// on OTP_REQUESTS (the ones provisioning is taking it off, platform.IssuerLeftovers). One
// of want missing (a provisioning not done yet, or stopped halfway) is logged, shown by
// otpflow_issuer_consumer_missing and bound later by read; none bound at all is the
// *platform.MissingError of the first: OTP_REQUESTS has not been provisioned for the
// issuer.
func (s *Service) bindExisting(ctx context.Context, want []jetstream.ConsumerConfig) ([]boundConsumer, error) {
	leftovers, err := platform.IssuerLeftovers(ctx, s.js, want)
	if err != nil {
		s.log.Warn("the issuer's other consumers on OTP_REQUESTS not listed; reading those it is provisioned with", "err", err)
	}
	var bound []boundConsumer
	var missing []error
	for i, cc := range append(slices.Clone(want), leftovers...) {
		cons, err := platform.Bind(ctx, s.js, events.StreamRequests, cc)
		var me *platform.MissingError
		switch {
		case err != nil && i >= len(want):
			// A leftover deleted meanwhile, or one that cannot be read (changed by
			// hand, or no longer in the NATS permissions): the issuer reads the rest.
			s.log.Warn("a consumer provisioning is taking the issuer off cannot be read", "consumer", cc.Durable, "err", err)
		case errors.As(err, &me):
			missing = append(missing, err)
		case err != nil:
			return nil, err
		default:
			bound = append(bound, boundConsumer{cc, cons})
		}
	}
	var filters []string
	for _, b := range bound {
		filters = append(filters, b.cc.FilterSubject)
	}
	s.showMissing(want, filters)
	if len(bound) == 0 && len(missing) > 0 {
		return nil, missing[0]
	}
	for _, err := range missing {
		s.log.Error("a consumer OTP_REQUESTS is provisioned for is missing; reading the others, and it once it exists", "err", err)
	}
	return bound, nil
}

// reader is the loop of one durable.
type reader struct {
	filter string // the durable's filter subject
	stop   context.CancelFunc
	done   chan struct{}
	// gone: the durable no longer exists, and its metrics go with the loop.
	gone atomic.Bool
}

// read reads every durable in bound until ctx ends and, every ConsumersCheckEvery,
// starts reading a durable OTP_REQUESTS is now provisioned with and lets one go that
// provisioning deleted, once its batch in hand is done. A loop that fails ends the issuer.
func (s *Service) read(ctx context.Context, bound []boundConsumer) error {
	running := map[string]*reader{}
	failed := make(chan error, 1)
	var wg sync.WaitGroup
	start := func(b boundConsumer) {
		rctx, stop := context.WithCancel(ctx)
		r := &reader{stop: stop, done: make(chan struct{}), filter: b.cc.FilterSubject}
		running[b.cc.Durable] = r
		s.log.Info("issuer consuming", "stream", events.StreamRequests, "consumer", b.cc.Durable)
		wg.Go(func() {
			defer close(r.done)
			forget, err := s.readConsumer(rctx, b)
			gone := r.gone.Load()
			if err != nil && rctx.Err() == nil {
				// Deleted under the loop (provisioning retired it; Run asked the
				// server): the next check binds it again if it is back.
				if gone = errors.Is(err, jetstream.ErrConsumerNotFound); gone {
					s.log.Warn("a consumer of the issuer was deleted while read", "consumer", b.cc.Durable, "err", err)
				} else {
					select {
					case failed <- fmt.Errorf("consumer %s: %w", b.cc.Durable, err):
					default:
					}
				}
			}
			if gone {
				forget()
			}
		})
	}
	defer func() {
		for _, r := range running {
			r.stop()
		}
		wg.Wait()
	}()
	for _, b := range bound {
		start(b)
	}
	t := time.NewTicker(s.cfg.ConsumersCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-failed:
			return err
		case <-t.C:
		}
		// A loop that ended on its own (its durable deleted under it) is started again
		// below if the durable is still provisioned and back.
		for name, r := range running {
			select {
			case <-r.done:
				delete(running, name)
			default:
			}
		}
		check, cancel := context.WithTimeout(ctx, s.cfg.ConsumersCheckEvery+10*time.Second)
		gone, err := s.checkConsumers(check, running, start)
		cancel()
		if err != nil && ctx.Err() == nil {
			s.log.Warn("which consumers to read OTP_REQUESTS through not checked", "err", err)
		}
		// Let go of the deleted ones together: each finishes its batch in hand.
		for _, name := range gone {
			running[name].gone.Store(true)
			running[name].stop()
		}
		for _, name := range gone {
			<-running[name].done
			delete(running, name)
			s.log.Info("issuer no longer reads a consumer provisioning deleted", "stream", events.StreamRequests, "consumer", name)
		}
	}
}

// checkConsumers starts a reader for each durable OTP_REQUESTS is provisioned with, and
// each other durable of the issuer there (platform.IssuerLeftovers), that exists and has
// none, and returns the running ones provisioning no longer names that the server no
// longer has.
func (s *Service) checkConsumers(ctx context.Context, running map[string]*reader, start func(boundConsumer)) ([]string, error) {
	want, err := platform.IssuerConsumersNow(ctx, s.js)
	if err != nil {
		return nil, err
	}
	var errs []error
	leftovers, err := platform.IssuerLeftovers(ctx, s.js, want)
	if err != nil {
		errs = append(errs, err)
	}
	for i, cc := range append(slices.Clone(want), leftovers...) {
		if running[cc.Durable] != nil {
			continue
		}
		cons, err := platform.Bind(ctx, s.js, events.StreamRequests, cc)
		if err != nil {
			// Provisioning makes a tenant's stream before its durable: a later check
			// binds it.
			if i < len(want) {
				errs = append(errs, err)
			}
			continue
		}
		start(boundConsumer{cc, cons})
	}
	var filters []string
	for _, r := range running {
		filters = append(filters, r.filter)
	}
	s.showMissing(want, filters)
	var gone []string
	for _, name := range slices.Sorted(maps.Keys(running)) {
		if slices.ContainsFunc(want, func(cc jetstream.ConsumerConfig) bool { return cc.Durable == name }) {
			continue
		}
		_, err := s.js.Consumer(ctx, events.StreamRequests, name)
		switch {
		case errors.Is(err, jetstream.ErrConsumerNotFound):
			gone = append(gone, name)
		case err != nil:
			errs = append(errs, fmt.Errorf("consumer %s: %w", name, err))
		}
	}
	return gone, errors.Join(errs...)
}

// readConsumer handles the requests of durable b until ctx ends, and watches its backlog
// beside it, so that a consumer stuck on its database is noticed as well as a slow one.
// forget takes the durable's metrics out of the registry, once it is gone.
func (s *Service) readConsumer(ctx context.Context, b boundConsumer) (forget func(), err error) {
	g, gctx := errgroup.WithContext(ctx)
	watch := &platform.BacklogWatch{JS: s.js, Stream: events.StreamRequests, Consumer: b.cc.Durable,
		Filter: b.cc.FilterSubject, Bound: s.cfg.Streams.RequestsAge(), AlertAt: s.cfg.LagAlert,
		Every: s.cfg.LagCheckEvery, Rule: RuleRequestsBacklog, Source: "otpflow/issuer", Log: s.log, Reg: s.reg,
		Gate: s.store}
	if b.cc.Durable != events.ConsumerIssuer {
		// A tenant's backlog alert is raised apart from the others'.
		watch.Scope = b.cc.Durable
	}
	g.Go(func() error { return watch.Run(gctx) })
	// Healthy: a batch whose every request fails alone is blamed on the requests only
	// while the database answers; otherwise the consumer waits for it. Apps publish here,
	// and an app can publish a request the JetStream client never hands over (an empty
	// body with a Status header): readExhausted dead-letters it once the server gives it
	// up.
	c := platform.NewConsumer(b.cons, platform.ConsumeConfig{Name: b.cc.Durable, BatchSize: s.cfg.BatchSize,
		JS: s.js, Log: s.log, Reg: s.reg, Healthy: s.store.pool.Ping, DeadLetters: s.deadLetters()})
	s.live.Store(b.cc.Durable, c)
	defer s.live.CompareAndDelete(b.cc.Durable, c)
	g.Go(func() error { return c.Run(gctx, s.handleBatch) })
	err = g.Wait()
	return func() { c.Forget(); watch.Forget() }, err
}

// showMissing sets otpflow_issuer_consumer_missing for each durable of want: 1 when no
// durable read (of filters) takes its subjects, so its tenant's requests go unread (while
// provisioning moves the issuer, the shared durable still takes them all); it drops the
// series of a durable no longer wanted, so that an alert on it ends with the tenant.
func (s *Service) showMissing(want []jetstream.ConsumerConfig, filters []string) {
	shown := map[string]bool{}
	for _, cc := range want {
		v := 1.0
		if slices.ContainsFunc(filters, func(f string) bool { return platform.SubjectMatches(f, cc.FilterSubject) }) {
			v = 0
		}
		s.missing.WithLabelValues(cc.Durable).Set(v)
		shown[cc.Durable] = true
	}
	for name := range s.missingShown {
		if !shown[name] {
			s.missing.DeleteLabelValues(name)
		}
	}
	s.missingShown = shown
}

// deadLetters is how the issuer writes its dead letters: sealed, with the request's
// recipient hash.
func (s *Service) deadLetters() *platform.DeadLetters {
	return &platform.DeadLetters{Sealer: s.cfg.DLQKey, Recipient: platform.RequestRecipient(s.cfg.Subjects)}
}

// readExhausted dead-letters the requests one of the issuer's durables gave up after
// their deliveries with none settled (platform.RunExhausted), through the issuer's durable
// on OTP_ADVISORIES, which keeps the server's advisories while no issuer is connected.
// Until that durable exists (a provisioning of an earlier release) the issuer runs
// without it, shows it in otpflow_issuer_consumer_missing and binds it once it does.
func (s *Service) readExhausted(ctx context.Context) error {
	cc := events.IssuerExhaustedConsumer
	logged := false
	return platform.RunExhausted(ctx, platform.ExhaustedConfig{Consumer: cc, Stream: events.StreamRequests, Owns: events.IsIssuerConsumer,
		Holds: func(durable string, seq uint64) bool {
			c, ok := s.live.Load(durable)
			return ok && c.(*platform.Consumer).Holds(seq)
		},
		Missing: func(err error) {
			if err == nil {
				s.missing.WithLabelValues(cc.Durable).Set(0)
				logged = false
				return
			}
			s.missing.WithLabelValues(cc.Durable).Set(1)
			if !logged {
				s.log.Error("the issuer's consumer on OTP_ADVISORIES is missing or cannot be read: a request given up after its deliveries is not dead-lettered until it is (provision, and the NATS permissions)",
					"consumer", cc.Durable, "err", err)
				logged = true
			}
		},
		CheckEvery: s.cfg.ConsumersCheckEvery,
		JS:         s.js, DeadLetters: s.deadLetters(), Log: s.log, Reg: s.reg})
}
