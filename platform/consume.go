package platform

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
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
// message cannot hold back its neighbours, and settles each that fails alone by what its
// error says: data the database refuses is dead-lettered at once; a neighbour
// that is down (the database, NATS) is waited out with the deliveries held in order and
// none dead-lettered; any other failure is retried after a delay growing with its
// deliveries and, once they are spent, dead-lettered.
type BatchHandler func(ctx context.Context, batch []*Delivery) error

// ConsumeConfig configures a Consumer.
type ConsumeConfig struct {
	// Name labels the settle metrics and logs: the durable consumer's name.
	Name string
	// BatchSize is the most deliveries handed over at once (default 1); Prefetch the
	// most pulled ahead of the handler (default 2×BatchSize). Pulled messages wait with
	// their AckWait running, so a consumer whose handler can be slow keeps Prefetch small.
	BatchSize, Prefetch int
	// Linger is how long a batch that is not full waits for more deliveries before it is
	// handed over (default 0: at once, with what has arrived). For a projection whose
	// cost is mostly per batch (a transaction, a statement per kind of row), not for a
	// stage someone waits on: it adds up to Linger to each delivery's latency when the
	// stream is quiet, and nothing when batches fill.
	Linger time.Duration
	// MaxRetryDelay caps the redelivery delay of a delivery that failed, and the wait
	// between two tries of deliveries held in place (default 30 s).
	MaxRetryDelay time.Duration
	// MaxInProgress bounds how long a delivery is kept in progress unsettled (default ten
	// AckWaits): past it the consumer stops its heartbeats, logs and counts it, and
	// JetStream redelivers it after its AckWait, so a hung stage or a forgotten delivery
	// is not held for as long as the process lives. Deliveries the consumer itself holds
	// and tries again (a neighbour down) are not forgotten: each try renews them.
	MaxInProgress time.Duration
	// Ordered is for a handler whose effects must follow stream order (the auditor's
	// chain). A failed batch is run one delivery at a time only up to the first that
	// fails for a reason other than refused data; that one is tried again in place, the
	// deliveries after it held behind it, until it succeeds or its retries are spent
	// (MaxDeliver tries in all, counting its deliveries; 10 without a MaxDeliver). Nothing
	// after it is handled first. Unordered, each failing delivery is put back with a delay
	// while the others go on.
	Ordered bool
	// Healthy, when set, says whether the neighbour the handler needs (its database)
	// answers. When every delivery of a batch failed alone, with errors that name no
	// cause, the consumer blames the messages only while Healthy says so; otherwise it
	// waits for the neighbour with the deliveries held. Without it, such failures are
	// blamed on the messages.
	Healthy func(context.Context) error
	// NoRecover lets a panic of the handler take the process down, as Go does, instead
	// of failing the batch (ErrHandlerPanicked): for a handler that holds what a panic
	// would leak (the dispatcher's send slots and claims). After MaxDeliver such crashes
	// the server gives the message up (platform.RunExhausted).
	NoRecover bool
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
	// durable is the durable consumer's name, which its dead letters carry.
	durable string
	beats   *heartbeats
	// waiting are the deliveries pulled and not yet handed over (Run).
	waiting deliverySet

	settled, ignored, stuck, held, restarts *prometheus.CounterVec
	// lag is the durable's lag collector registered in cfg.Reg, if any (Forget).
	lag *ConsumerLag
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
	ackWait, maxDeliver, durable := 30*time.Second, 0, cfg.Name
	var lag *ConsumerLag
	if info := cons.CachedInfo(); info != nil {
		if info.Config.AckWait > 0 {
			ackWait = info.Config.AckWait
		}
		maxDeliver = info.Config.MaxDeliver
		if info.Name != "" {
			durable = info.Name
		}
		if cfg.Reg != nil {
			// Every durable consumer's lag, for the alerts and dashboards; a second
			// Consumer on the same durable in one process finds it registered already.
			lag = registerOnce(cfg.Reg, NewConsumerLag(cons, info.Stream, info.Name))
		}
	}
	if cfg.MaxInProgress <= 0 {
		cfg.MaxInProgress = 10 * ackWait
	}
	c := &Consumer{
		cons: cons, cfg: cfg, log: cfg.Log, maxDeliver: maxDeliver, durable: durable, lag: lag,
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
		restarts: registerCounterVec(cfg.Reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_consumer_restarts_total",
			Help: "Times a consumer's pull stopped while the service ran (a terminal status, or a stored message that looks like one) and was started again, by consumer.",
		}, []string{"consumer"})),
		held: registerCounterVec(cfg.Reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_deliveries_held_retries_total",
			Help: "Times a consumer tried again deliveries it held in place, in order, while a neighbour (the database, NATS) was unavailable or an ordered consumer's delivery kept failing, by consumer.",
		}, []string{"consumer"})),
	}
	c.beats = &heartbeats{every: ackWait / 4, maxAge: cfg.MaxInProgress, open: map[*Delivery]time.Time{}, onStuck: c.givenUp}
	return c
}

// Forget takes the durable's lag out of the registry, once the durable is gone (the
// issuer's durable of a tenant provisioning retired): its lag can no longer be read, and
// one metric that cannot be collected fails the whole scrape. The settle counters stay.
func (c *Consumer) Forget() {
	if c.lag != nil && c.cfg.Reg != nil {
		c.cfg.Reg.Unregister(c.lag)
	}
}

// Waiting is how many deliveries Run has pulled and not yet handed to its handler: those
// a batch lingers for, or that wait behind the batch in hand.
func (c *Consumer) Waiting() int { return c.waiting.len() }

// givenUp records a delivery that stayed unsettled past MaxInProgress.
func (c *Consumer) givenUp(d *Delivery) {
	c.stuck.WithLabelValues(c.cfg.Name).Inc()
	c.log.Error("delivery unsettled too long; no longer kept in progress, it will be redelivered",
		"consumer", c.cfg.Name, "seq", d.meta.Sequence, "deliveries", d.meta.NumDelivered, "max_in_progress", c.cfg.MaxInProgress)
}

// registerCounterVec registers v, or returns the one registered before under its name.
func registerCounterVec(reg prometheus.Registerer, v *prometheus.CounterVec) *prometheus.CounterVec {
	return registerOnce(reg, v)
}

// registerOnce registers v, or returns the collector of its type registered before under
// its name.
func registerOnce[T prometheus.Collector](reg prometheus.Registerer, v T) T {
	if reg == nil {
		return v
	}
	if err := reg.Register(v); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(T); ok {
				return existing
			}
		}
	}
	return v
}

// ErrHandlerPanicked marks a batch whose handler panicked: the panic is taken for the
// batch's failure, so a message that crashes its handler is isolated, retried and
// dead-lettered after its deliveries like any that fails, instead of taking the process
// down on every delivery until the server gives it up unrecorded.
var ErrHandlerPanicked = errors.New("the handler panicked")

// recovering is handle with a panic turned into an error wrapping ErrHandlerPanicked.
func (c *Consumer) recovering(handle BatchHandler) BatchHandler {
	return func(ctx context.Context, batch []*Delivery) (err error) {
		defer func() {
			if p := recover(); p != nil {
				c.log.Error("handler panicked", "consumer", c.cfg.Name, "deliveries", len(batch), "panic", fmt.Sprint(p),
					"stack", string(debug.Stack()))
				err = fmt.Errorf("%w: %v", ErrHandlerPanicked, p)
			}
		}()
		return handle(ctx, batch)
	}
}

// Run pulls and hands the handler batches of up to BatchSize deliveries: the first
// waiting message plus whatever else has already arrived (or arrives within Linger), so a
// quiet stream gets batches of one with no added latency (Linger 0) and a busy one gets
// full batches. At most Prefetch
// messages are pulled ahead. On cancel it stops pulling, hands over the messages it
// already holds and returns; deliveries still unsettled then are redelivered after
// their AckWait unless their stage settles them, and deliveries held for a neighbour
// that is down are put back at once.
func (c *Consumer) Run(ctx context.Context, handle BatchHandler) error {
	if !c.cfg.NoRecover {
		handle = c.recovering(handle)
	}
	size, prefetch := c.cfg.BatchSize, c.cfg.Prefetch
	// Room for everything Consume may have pulled while a batch is in hand, so the
	// delivery callback (which also sees heartbeats) does not block.
	buf := make(chan *Delivery, 2*prefetch+1)
	// The error that ended the last Consume, if any: errors of several types (a
	// jetstream error, "no responders"), which an atomic.Value would refuse.
	var stopErr atomic.Pointer[error]
	// A pulled message is kept in progress from the moment it arrives, not only once it is
	// handed over: while a batch is held (a neighbour down), the messages pulled behind it
	// wait here, and would otherwise spend their deliveries on the server meanwhile.
	receive := func(m jetstream.Msg) {
		if d := c.delivery(m); d != nil {
			c.beats.add(d)
			c.waiting.add(d)
			buf <- d
		}
	}
	consume := func() (jetstream.ConsumeContext, error) {
		return c.cons.Consume(receive,
			jetstream.PullMaxMessages(prefetch),
			jetstream.PullExpiry(5*time.Second),
			jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
				stopErr.Store(&err)
			}),
		)
	}
	cc, err := consume()
	if err != nil {
		return fmt.Errorf("consume: %w", err)
	}
	work := context.WithoutCancel(ctx)
	batch := make([]*Delivery, 0, size)
	flush := func() {
		if len(batch) > 0 {
			for _, d := range batch {
				c.waiting.remove(d)
			}
			c.handle(work, ctx.Done(), batch, handle)
			batch = batch[:0]
		}
	}
	// collect makes a batch of first and what follows it: what has arrived, and with
	// wait, what arrives within Linger, until the batch is full.
	var linger *time.Timer
	collect := func(first *Delivery, wait bool) {
		batch = append(batch, first)
		started := false
		defer func() {
			if started {
				linger.Stop()
			}
		}()
		for len(batch) < size {
			select {
			case m := <-buf:
				batch = append(batch, m)
				continue
			default:
			}
			if !wait || c.cfg.Linger <= 0 || ctx.Err() != nil {
				return
			}
			if !started {
				started = true
				if linger == nil {
					linger = time.NewTimer(c.cfg.Linger)
				} else {
					linger.Reset(c.cfg.Linger)
				}
			}
			select {
			case m := <-buf:
				batch = append(batch, m)
			case <-linger.C:
				return
			case <-ctx.Done():
				return
			}
		}
	}
	drain := func() {
		for {
			select {
			case m := <-buf:
				collect(m, false) // nothing more is coming
				flush()
			default:
				return
			}
		}
	}
	restart := time.Duration(0)
	done := ctx.Done()
	for {
		select {
		case <-done:
			cc.Drain() // buffered messages are still delivered to buf
			done = nil
		case <-cc.Closed():
			drain()
			if ctx.Err() != nil {
				return nil
			}
			// The client stopped pulling while the service runs. It does so on what it
			// takes for a terminal status of the server (400, 409 consumer deleted), and a
			// stored message with an empty body and a Status header of its own looks like
			// one: an app can publish that. Pull again, so no message stops a consumer;
			// the server gives such a message up after MaxDeliver (it never reaches the
			// handler) and RunExhausted dead-letters it then.
			var cause error
			if p := stopErr.Load(); p != nil {
				cause = *p
			}
			// The server's own word decides whether the durable is gone (provisioning
			// deleted it): then this consumer ends, with an error that says so
			// (jetstream.ErrConsumerNotFound), rather than pull from nothing.
			if errors.Is(cause, jetstream.ErrConsumerDeleted) {
				ictx, cancel := context.WithTimeout(ctx, 5*time.Second)
				_, err := c.cons.Info(ictx)
				cancel()
				if errors.Is(err, jetstream.ErrConsumerNotFound) {
					return fmt.Errorf("consume: durable %s: %w", c.durable, err)
				}
			}
			restart = min(max(2*restart, 100*time.Millisecond), c.cfg.MaxRetryDelay)
			c.restarts.WithLabelValues(c.cfg.Name).Inc()
			c.log.Error("consumer stopped pulling; pulling again", "consumer", c.cfg.Name, "err", cause, "retry_in", restart)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(restart):
			}
			if cc, err = consume(); err != nil {
				return fmt.Errorf("consume again: %w", err)
			}
		case m := <-buf:
			restart = 0
			collect(m, true)
			flush()
		}
	}
}

// Handle hands msgs to handle as one batch, exactly as Run does with a pulled batch. It
// returns when the handler has returned and the failures are settled or, for deliveries
// held while a neighbour is down, once they succeed or ctx is done; deliveries the
// handler passed on stay in progress until settled.
func (c *Consumer) Handle(ctx context.Context, msgs []jetstream.Msg, handle BatchHandler) {
	if !c.cfg.NoRecover {
		handle = c.recovering(handle)
	}
	c.handleMsgs(ctx, ctx.Done(), msgs, handle)
}

func (c *Consumer) handleMsgs(ctx context.Context, stop <-chan struct{}, msgs []jetstream.Msg, handle BatchHandler) {
	batch := make([]*Delivery, 0, len(msgs))
	for _, m := range msgs {
		if d := c.delivery(m); d != nil {
			c.beats.add(d)
			batch = append(batch, d)
		}
	}
	if len(batch) > 0 {
		c.handle(ctx, stop, batch, handle)
	}
}

// delivery is m as a Delivery of this consumer; nil (and m redelivered) when m is not a
// JetStream delivery.
func (c *Consumer) delivery(m jetstream.Msg) *Delivery {
	md, err := m.Metadata()
	if err != nil {
		// Not a JetStream delivery: nothing to hand over or to dead-letter.
		c.log.Error("delivery without metadata; redelivering", "consumer", c.cfg.Name, "err", err)
		_ = m.NakWithDelay(time.Second)
		c.settled.WithLabelValues(c.cfg.Name, "retry").Inc()
		return nil
	}
	return &Delivery{msg: m, c: c, meta: Meta{Stream: md.Stream, Sequence: md.Sequence.Stream,
		NumDelivered: md.NumDelivered, Timestamp: md.Timestamp}}
}

// handle runs the handler on batch and, if it fails, isolates the deliveries it failed
// on (isolate). Those held for another try are tried again, as a batch in stream order,
// after a delay growing with each try, until none is left or stop: then they are given
// back to JetStream.
func (c *Consumer) handle(ctx context.Context, stop <-chan struct{}, batch []*Delivery, handle BatchHandler) {
	err := handle(ctx, batch)
	pending := unsettled(batch)
	if err == nil || len(pending) == 0 {
		return
	}
	if len(pending) > 1 {
		c.log.Warn("batch failed; handling its deliveries one at a time", "consumer", c.cfg.Name,
			"deliveries", len(pending), "err", err)
	}
	var lead *Delivery
	for try := uint64(1); ; try++ {
		if pending = c.isolate(ctx, pending, err, handle); len(pending) == 0 {
			return
		}
		if pending[0] != lead { // another delivery leads: its own tries start over
			lead, try = pending[0], 1
		}
		after := RetryDelay(try, c.cfg.MaxRetryDelay)
		c.log.Warn("deliveries held in order; trying them again", "consumer", c.cfg.Name, "deliveries", len(pending),
			"first_seq", pending[0].meta.Sequence, "retry_in", after, "err", pending[0].lastErr)
		for _, d := range pending {
			c.beats.add(d) // tried again, not forgotten: MaxInProgress starts over
		}
		for _, d := range c.waiting.all() {
			c.beats.add(d) // and those pulled behind them, which wait for them
		}
		t := time.NewTimer(after)
		select {
		case <-stop:
			t.Stop()
			for _, d := range pending {
				d.Settle(c.givenBack(d))
			}
			return
		case <-t.C:
		}
		c.held.WithLabelValues(c.cfg.Name).Inc()
		err = handle(ctx, pending)
		if pending = unsettled(pending); err == nil || len(pending) == 0 {
			return
		}
	}
}

func unsettled(batch []*Delivery) []*Delivery {
	var out []*Delivery
	for _, d := range batch {
		if !d.isSettled() {
			out = append(out, d)
		}
	}
	return out
}

// isolate runs each of pending alone, in stream order (pending failed together with err,
// which is the error of the one delivery when it is alone), settles each failure that
// names its delivery and returns the deliveries to hold and try again: those that met a
// neighbour that is down and, for an ordered consumer, the first that failed with every
// delivery after it.
func (c *Consumer) isolate(ctx context.Context, pending []*Delivery, err error, handle BatchHandler) []*Delivery {
	var failed []*Delivery
	handled := false // a delivery succeeded alone: the neighbours answer
	probe := c.probe(ctx)
	for i, d := range pending {
		e := err
		if len(pending) > 1 {
			e = handle(ctx, []*Delivery{d})
		}
		if e == nil {
			handled = true
			continue
		}
		if d.isSettled() {
			continue
		}
		d.lastErr = e
		if failureOf(e) == failureRefused {
			// A refusal can be a race: a unique key another process (a replica, the copy
			// of a redelivery) took a moment before. One more try alone before the DLQ.
			if e = handle(ctx, []*Delivery{d}); e == nil {
				handled = true
				continue
			}
			if d.isSettled() {
				continue
			}
			d.lastErr = e
		}
		if failureOf(e) == failureRefused {
			d.Settle(c.refused(d, e))
			continue
		}
		if c.cfg.Ordered {
			// Nothing after it goes first: it leads the deliveries held behind it.
			if !onNeighbour(e, handled, probe) {
				n := d.meta.NumDelivered + d.tries
				if n >= c.triesAllowed() {
					d.Settle(c.failed(d, n, e))
					continue
				}
				d.tries++
			}
			return pending[i:]
		}
		failed = append(failed, d)
	}
	// Judged once every delivery was tried: one that succeeded clears the neighbours.
	var held []*Delivery
	for _, d := range failed {
		if onNeighbour(d.lastErr, handled, probe) {
			held = append(held, d)
			continue
		}
		d.Settle(c.failed(d, d.meta.NumDelivered, d.lastErr))
	}
	return held
}

// failureKind is what a handler's error says about the delivery it failed on.
type failureKind uint8

const (
	// failureUnknown names no cause: the message or a neighbour.
	failureUnknown failureKind = iota
	// failureRefused is data the database will never take (RefusedByDatabase): the
	// message's own, so no retry cures it.
	failureRefused
	// failureUnavailable is a neighbour down or unreachable — the database (connection
	// lost or refused, shutting down, out of connections, the role locked out, a collision
	// with another transaction) or NATS (no connection, no answer in time) — or an error
	// wrapping ErrUnavailable: no message causes it, every message meets it alike.
	failureUnavailable
)

// ErrUnavailable marks, wrapped in a handler's error, a neighbour the handler could not
// reach: the consumer waits for it rather than blaming the message.
var ErrUnavailable = errors.New("unavailable")

// failureOf classifies a handler's error: the one table from which the consumer decides
// between dead-lettering a message, waiting for a neighbour and retrying.
func failureOf(err error) failureKind {
	if _, ok := RefusedByDatabase(err); ok {
		return failureRefused
	}
	var netErr net.Error
	switch {
	case errors.Is(err, ErrUnavailable), databaseUnavailable(err), errors.As(err, &netErr),
		errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, nats.ErrConnectionClosed), errors.Is(err, nats.ErrDisconnected),
		errors.Is(err, nats.ErrNoServers), errors.Is(err, nats.ErrTimeout), errors.Is(err, nats.ErrNoResponders),
		errors.Is(err, jetstream.ErrNoStreamResponse):
		return failureUnavailable
	}
	return failureUnknown
}

// onNeighbour says whether a failure other than refused data is put on a neighbour
// rather than on the message: a neighbour down; or a failure that names no cause while
// no other delivery succeeded meanwhile (handled) and the neighbour does not answer its
// probe (healthy).
func onNeighbour(err error, handled bool, healthy func() bool) bool {
	if failureOf(err) == failureUnavailable {
		return true
	}
	return !handled && !healthy()
}

// probe returns a check of the neighbour, run at most once per call of isolate: true
// without a Healthy function.
func (c *Consumer) probe(ctx context.Context) func() bool {
	if c.cfg.Healthy == nil {
		return func() bool { return true }
	}
	var ok *bool
	return func() bool {
		if ok == nil {
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := c.cfg.Healthy(pctx)
			cancel()
			healthy := err == nil
			ok = &healthy
			if err != nil {
				c.log.Warn("neighbour unhealthy; failures held, not blamed on the messages", "consumer", c.cfg.Name, "err", err)
			}
		}
		return *ok
	}
}

// triesAllowed is how often an ordered consumer tries a delivery, its deliveries counted.
func (c *Consumer) triesAllowed() uint64 {
	if c.maxDeliver > 0 {
		return uint64(c.maxDeliver)
	}
	return 10
}

// failed is the outcome of a delivery its handler failed on alone after n tries: a retry
// after a delay growing with them or, on its last delivery, a dead letter with the error,
// so it is not silently dropped by MaxDeliver.
func (c *Consumer) failed(d *Delivery, n uint64, err error) Outcome {
	if (c.maxDeliver > 0 && n >= uint64(c.maxDeliver)) || (c.cfg.Ordered && n >= c.triesAllowed()) {
		tenant := tenantOf(d.Subject())
		return DeadLetter(tenant, fmt.Sprintf("%s: failed %d times: %v", c.cfg.Name, n, err))
	}
	c.log.Error("delivery failed; retrying", "consumer", c.cfg.Name, "seq", d.meta.Sequence, "delivered", n, "err", err)
	return Retry(RetryDelay(n, c.cfg.MaxRetryDelay))
}

// refused is the outcome of a delivery whose data the database refuses: a dead letter
// naming the SQLSTATE, never the refused value.
func (c *Consumer) refused(d *Delivery, err error) Outcome {
	tenant := tenantOf(d.Subject())
	reason := err.Error()
	if r, ok := RefusedByDatabase(err); ok {
		reason = r.Error()
	}
	c.log.Error("delivery refused by the database; dead-lettered", "consumer", c.cfg.Name, "seq", d.meta.Sequence, "err", reason)
	return DeadLetter(tenant, c.cfg.Name+": "+reason)
}

// givenBack is the outcome of a delivery held when the consumer stops: back to JetStream
// for another process, or, when JetStream would not deliver it again, to the DLQ with the
// failure it was held for.
func (c *Consumer) givenBack(d *Delivery) Outcome {
	if c.maxDeliver > 0 && d.meta.NumDelivered >= uint64(c.maxDeliver) {
		tenant := tenantOf(d.Subject())
		return DeadLetter(tenant, fmt.Sprintf("%s: still failing on its last delivery when the consumer stopped: %v", c.cfg.Name, d.lastErr))
	}
	return Retry(time.Second)
}

// tenantOf is the tenant token of subject, or "" (a dead letter's "_unknown") for one of
// the server's own ("$JS.EVENT.ADVISORY…"), whose last token names a durable.
func tenantOf(subject string) string {
	if strings.HasPrefix(subject, "$") {
		return ""
	}
	_, tenant, _ := events.SplitSubject(subject)
	return tenant
}
