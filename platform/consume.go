package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/prometheus/client_golang/prometheus"
)

// BatchHandler handles one batch of deliveries. It settles each one, now or later (a
// delivery handed to another stage is settled there). It runs with a context that
// shutdown does not cancel, so the batch in hand finishes.
//
// A handler that returns an error must not have handed any delivery it left unsettled to
// another stage: the consumer runs it again with each of them alone, so one poison
// message cannot hold back its neighbours, and settles a delivery that fails alone with
// Retry after a delay growing with its deliveries or, on its last delivery, DeadLetter.
type BatchHandler func(ctx context.Context, batch []*Delivery) error

// ConsumeConfig configures a Consumer.
type ConsumeConfig struct {
	// Name labels the settle metrics and logs: the durable consumer's name.
	Name string
	// BatchSize is the most deliveries handed over at once (default 1); Prefetch the
	// most pulled ahead of the handler (default 2×BatchSize). Pulled messages wait with
	// their AckWait running, so a consumer whose handler can be slow keeps Prefetch small.
	BatchSize, Prefetch int
	// MaxRetryDelay caps the redelivery delay of a delivery that failed (default 30 s).
	MaxRetryDelay time.Duration
	// MaxInProgress bounds how long a delivery is kept in progress unsettled (default ten
	// AckWaits): past it the consumer stops its heartbeats, logs and counts it, and
	// JetStream redelivers it after its AckWait, so a hung stage or a forgotten delivery
	// is not held for as long as the process lives.
	MaxInProgress time.Duration
	// JS publishes dead letters; DeadLetters seals them. Without a DLQ key a dead letter
	// is never written: the delivery is retried instead (ErrNoDLQKey).
	JS          jetstream.JetStream
	DeadLetters *DeadLetters
	Log         *slog.Logger
	// Reg, when set, gets the settle metrics, which consumers of one process share, and
	// the durable consumer's lag (ConsumerLag).
	Reg prometheus.Registerer
}

// Consumer hands the messages of a durable JetStream consumer to a service as
// Deliveries, keeps them in progress until they are settled, and applies every outcome.
type Consumer struct {
	cons       jetstream.Consumer
	cfg        ConsumeConfig
	log        *slog.Logger
	maxDeliver int
	beats      *heartbeats

	settled, ignored, stuck *prometheus.CounterVec
}

// NewConsumer wraps cons. Its AckWait sets the heartbeat (a quarter of it) and its
// MaxDeliver the last delivery, which a failure dead-letters instead of retrying.
func NewConsumer(cons jetstream.Consumer, cfg ConsumeConfig) *Consumer {
	cfg.BatchSize = max(cfg.BatchSize, 1)
	if cfg.Prefetch < 1 {
		cfg.Prefetch = 2 * cfg.BatchSize
	}
	if cfg.MaxRetryDelay <= 0 {
		cfg.MaxRetryDelay = 30 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	ackWait, maxDeliver := 30*time.Second, 0
	if info := cons.CachedInfo(); info != nil {
		if info.Config.AckWait > 0 {
			ackWait = info.Config.AckWait
		}
		maxDeliver = info.Config.MaxDeliver
		if cfg.Reg != nil {
			// Every durable consumer's lag, for the alerts and dashboards; a second
			// Consumer on the same durable in one process finds it registered already.
			_ = cfg.Reg.Register(NewConsumerLag(cons, info.Stream, info.Name))
		}
	}
	if cfg.MaxInProgress <= 0 {
		cfg.MaxInProgress = 10 * ackWait
	}
	c := &Consumer{
		cons: cons, cfg: cfg, log: cfg.Log, maxDeliver: maxDeliver,
		settled: registerCounterVec(cfg.Reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_deliveries_settled_total",
			Help: "Deliveries settled, by consumer and outcome (ack, retry, terminate, dead_letter).",
		}, []string{"consumer", "outcome"})),
		ignored: registerCounterVec(cfg.Reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_deliveries_settled_again_total",
			Help: "Outcomes ignored because the delivery was already settled, by consumer and outcome.",
		}, []string{"consumer", "outcome"})),
		stuck: registerCounterVec(cfg.Reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_deliveries_stuck_total",
			Help: "Deliveries left unsettled past MaxInProgress and so given back to redelivery, by consumer.",
		}, []string{"consumer"})),
	}
	c.beats = &heartbeats{every: ackWait / 4, maxAge: cfg.MaxInProgress, open: map[*Delivery]time.Time{}, onStuck: c.givenUp}
	return c
}

// givenUp records a delivery that stayed unsettled past MaxInProgress.
func (c *Consumer) givenUp(d *Delivery) {
	c.stuck.WithLabelValues(c.cfg.Name).Inc()
	c.log.Error("delivery unsettled too long; no longer kept in progress, it will be redelivered",
		"consumer", c.cfg.Name, "seq", d.meta.Sequence, "deliveries", d.meta.NumDelivered, "max_in_progress", c.cfg.MaxInProgress)
}

// registerCounterVec registers v, or returns the one registered before under its name.
func registerCounterVec(reg prometheus.Registerer, v *prometheus.CounterVec) *prometheus.CounterVec {
	if reg == nil {
		return v
	}
	if err := reg.Register(v); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(*prometheus.CounterVec); ok {
				return existing
			}
		}
	}
	return v
}

// Run pulls and hands the handler batches of up to BatchSize deliveries: the first
// waiting message plus whatever else has already arrived, so a quiet stream gets batches
// of one with no added latency and a busy one gets full batches. At most Prefetch
// messages are pulled ahead. On cancel it stops pulling, hands over the messages it
// already holds and returns; deliveries still unsettled then are redelivered after
// their AckWait unless their stage settles them.
func (c *Consumer) Run(ctx context.Context, handle BatchHandler) error {
	size, prefetch := c.cfg.BatchSize, c.cfg.Prefetch
	// Room for everything Consume may have pulled while a batch is in hand, so the
	// delivery callback (which also sees heartbeats) does not block.
	buf := make(chan jetstream.Msg, 2*prefetch+1)
	cc, err := c.cons.Consume(func(m jetstream.Msg) { buf <- m },
		jetstream.PullMaxMessages(prefetch),
		jetstream.PullExpiry(5*time.Second),
	)
	if err != nil {
		return fmt.Errorf("consume: %w", err)
	}
	work := context.WithoutCancel(ctx)
	batch := make([]jetstream.Msg, 0, size)
	flush := func() {
		if len(batch) > 0 {
			c.Handle(work, batch, handle)
			batch = batch[:0]
		}
	}
	collect := func(first jetstream.Msg) {
		batch = append(batch, first)
		for len(batch) < size {
			select {
			case m := <-buf:
				batch = append(batch, m)
			default:
				return
			}
		}
	}
	done := ctx.Done()
	for {
		select {
		case <-done:
			cc.Drain() // buffered messages are still delivered to buf
			done = nil
		case <-cc.Closed():
			for {
				select {
				case m := <-buf:
					collect(m)
					flush()
				default:
					return nil
				}
			}
		case m := <-buf:
			collect(m)
			flush()
		}
	}
}

// Handle hands msgs to handle as one batch, exactly as Run does with a pulled batch. It
// returns when the handler has returned; deliveries it passed on stay in progress until
// settled.
func (c *Consumer) Handle(ctx context.Context, msgs []jetstream.Msg, handle BatchHandler) {
	batch := make([]*Delivery, 0, len(msgs))
	for _, m := range msgs {
		md, err := m.Metadata()
		if err != nil {
			// Not a JetStream delivery: nothing to hand over or to dead-letter.
			c.log.Error("delivery without metadata; redelivering", "consumer", c.cfg.Name, "err", err)
			_ = m.NakWithDelay(time.Second)
			c.settled.WithLabelValues(c.cfg.Name, "retry").Inc()
			continue
		}
		d := &Delivery{msg: m, c: c, meta: Meta{Stream: md.Stream, Sequence: md.Sequence.Stream,
			NumDelivered: md.NumDelivered, Timestamp: md.Timestamp}}
		c.beats.add(d)
		batch = append(batch, d)
	}
	if len(batch) > 0 {
		c.handle(ctx, batch, handle)
	}
}

// handle runs the handler on batch; if it fails, on each unsettled delivery alone.
func (c *Consumer) handle(ctx context.Context, batch []*Delivery, handle BatchHandler) {
	err := handle(ctx, batch)
	if err == nil {
		return
	}
	if len(batch) == 1 {
		if d := batch[0]; !d.isSettled() {
			d.Settle(c.failed(d, err))
		}
		return
	}
	c.log.Warn("batch failed; handling its deliveries one at a time", "consumer", c.cfg.Name,
		"deliveries", len(batch), "err", err)
	for _, d := range batch {
		if !d.isSettled() {
			c.handle(ctx, []*Delivery{d}, handle)
		}
	}
}

// failed is the outcome of a delivery its handler failed on alone: a retry after a delay
// growing with its deliveries or, on its last delivery, a dead letter with the error, so
// it is not silently dropped by MaxDeliver.
func (c *Consumer) failed(d *Delivery, err error) Outcome {
	n := d.meta.NumDelivered
	if c.maxDeliver > 0 && n >= uint64(c.maxDeliver) {
		_, tenant, _ := events.SplitSubject(d.Subject())
		return DeadLetter(tenant, fmt.Sprintf("%s: failed %d times: %v", c.cfg.Name, n, err))
	}
	c.log.Error("delivery failed; retrying", "consumer", c.cfg.Name, "seq", d.meta.Sequence, "delivered", n, "err", err)
	return Retry(RetryDelay(n, c.cfg.MaxRetryDelay))
}
