package issuer

import (
	"context"
	"fmt"
	"slices"
	"sync"
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

// reader is the loop of one durable.
type reader struct {
	stop context.CancelFunc
	done chan struct{}
}

// read reads every durable in want (bound to cons) until ctx ends, and every
// ConsumersCheckEvery reads again which durables OTP_REQUESTS is provisioned with: it
// starts reading one provisioning added (a new tenant, or the durables that take over
// when tenant streams are turned on or off) and lets one go that provisioning retired,
// once its batch in hand is done. A loop that fails ends the issuer.
func (s *Service) read(ctx context.Context, want []jetstream.ConsumerConfig, cons []jetstream.Consumer) error {
	running := map[string]*reader{}
	failed := make(chan error, 1)
	var wg sync.WaitGroup
	start := func(cc jetstream.ConsumerConfig, c jetstream.Consumer) {
		rctx, stop := context.WithCancel(ctx)
		r := &reader{stop: stop, done: make(chan struct{})}
		running[cc.Durable] = r
		s.log.Info("issuer consuming", "stream", events.StreamRequests, "consumer", cc.Durable)
		wg.Go(func() {
			defer close(r.done)
			if err := s.readConsumer(rctx, cc, c); err != nil && rctx.Err() == nil {
				select {
				case failed <- fmt.Errorf("consumer %s: %w", cc.Durable, err):
				default:
				}
			}
		})
	}
	defer func() {
		for _, r := range running {
			r.stop()
		}
		wg.Wait()
	}()
	for i, cc := range want {
		start(cc, cons[i])
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
		check, cancel := context.WithTimeout(ctx, s.cfg.ConsumersCheckEvery+10*time.Second)
		want, err := platform.IssuerConsumersNow(check, s.js)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("which consumers to read OTP_REQUESTS through not checked", "err", err)
			}
			continue
		}
		for _, cc := range want {
			if running[cc.Durable] != nil {
				continue
			}
			c, err := platform.Bind(ctx, s.js, events.StreamRequests, cc)
			if err != nil {
				// Provisioning makes a tenant's stream before its durable: the next
				// check binds it.
				s.log.Warn("a consumer OTP_REQUESTS is provisioned for cannot be read yet", "consumer", cc.Durable, "err", err)
				continue
			}
			start(cc, c)
		}
		for name, r := range running {
			if !slices.ContainsFunc(want, func(cc jetstream.ConsumerConfig) bool { return cc.Durable == name }) {
				r.stop()
				<-r.done
				delete(running, name)
				s.log.Info("issuer no longer reads a retired consumer", "stream", events.StreamRequests, "consumer", name)
			}
		}
	}
}

// readConsumer handles the requests of durable cc until ctx ends, and watches its
// backlog beside it, so that a consumer stuck on its database is noticed as well as a
// slow one.
func (s *Service) readConsumer(ctx context.Context, cc jetstream.ConsumerConfig, cons jetstream.Consumer) error {
	g, gctx := errgroup.WithContext(ctx)
	watch := &platform.BacklogWatch{JS: s.js, Stream: events.StreamRequests, Consumer: cc.Durable,
		Filter: cc.FilterSubject, Bound: s.cfg.Streams.RequestsAge(), AlertAt: s.cfg.LagAlert,
		Every: s.cfg.LagCheckEvery, Rule: RuleRequestsBacklog, Source: "otpflow/issuer", Log: s.log, Reg: s.reg,
		Gate: s.store}
	g.Go(func() error { return watch.Run(gctx) })
	// Healthy: a batch whose every request fails alone is blamed on the requests only
	// while the database answers; otherwise the consumer waits for it. Apps publish here,
	// and an app can publish a request the JetStream client never hands over (an empty
	// body with a Status header): DeadLetterExhausted dead-letters it once the server
	// gives it up.
	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: cc.Durable, BatchSize: s.cfg.BatchSize,
		JS: s.js, Log: s.log, Reg: s.reg, Healthy: s.store.pool.Ping, DeadLetterExhausted: true,
		DeadLetters: &platform.DeadLetters{Sealer: s.cfg.DLQKey, Recipient: platform.RequestRecipient(s.cfg.Subjects)}})
	g.Go(func() error { return c.Run(gctx, s.handleBatch) })
	return g.Wait()
}
