package platform

import (
	"context"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// Meta is where a delivery sits in its stream.
type Meta struct {
	Stream       string
	Sequence     uint64    // the message's stream sequence
	NumDelivered uint64    // 1 on the first delivery
	Timestamp    time.Time // when the stream stored the message
}

// Delivery is one pulled message in a service's hands. The service reads it and settles it
// once, with an Outcome, as soon as it knows what happened: in the handler or later, from
// another stage. Until then the consumer tells JetStream the delivery is in progress, so a
// slow one is not redelivered while its process lives. A second Settle is ignored (logged
// and counted). Services never call the JetStream ack methods themselves.
type Delivery struct {
	msg  jetstream.Msg
	meta Meta
	c    *Consumer

	mu        sync.Mutex
	settled   bool
	lingering bool // settled, but kept in progress while its outcome is still applied

	// Kept by the goroutine handling the delivery: the tries an ordered consumer made in
	// place beyond its deliveries, and the error it last failed with.
	tries   uint64
	lastErr error
}

// Subject is the subject the message was published to.
func (d *Delivery) Subject() string { return d.msg.Subject() }

// Data is the message body.
func (d *Delivery) Data() []byte { return d.msg.Data() }

// Headers are the message headers; read them, do not change them.
func (d *Delivery) Headers() nats.Header { return d.msg.Headers() }

// Meta is the delivery's stream position, delivery count and stored time.
func (d *Delivery) Meta() Meta { return d.meta }

// Settle applies o to the delivery, once: the first outcome wins, later ones are ignored.
// It may be called from any goroutine.
func (d *Delivery) Settle(o Outcome) {
	d.mu.Lock()
	first := !d.settled
	d.settled = true
	d.mu.Unlock()
	if !first {
		d.c.ignored.WithLabelValues(d.c.cfg.Name, o.String()).Inc()
		d.c.log.Warn("delivery settled twice; second outcome ignored", "consumer", d.c.cfg.Name,
			"seq", d.meta.Sequence, "outcome", o.String())
		return
	}
	d.c.beats.remove(d)
	d.c.apply(d, o)
}

func (d *Delivery) isSettled() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.settled
}

// heartbeat tells JetStream the delivery is still being worked on, unless it is settled
// (and not lingering while its outcome is applied).
func (d *Delivery) heartbeat() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.settled || d.lingering {
		_ = d.msg.InProgress()
	}
}

// Outcome is what becomes of a delivery. Build one with Ack, Retry, Terminate,
// DeadLetter or Failed; the zero Outcome is a retry after a second.
type Outcome struct {
	kind   outcomeKind
	after  time.Duration
	tenant string
	reason string
	err    error
}

type outcomeKind uint8

const (
	kindRetry outcomeKind = iota
	kindAck
	kindTerminate
	kindDeadLetter
	kindFailed
)

// Ack: the delivery is done with and is not redelivered.
func Ack() Outcome { return Outcome{kind: kindAck} }

// Retry: redeliver after the delay (to this or another process).
func Retry(after time.Duration) Outcome {
	if after <= 0 {
		after = time.Second
	}
	return Outcome{kind: kindRetry, after: after}
}

// Terminate: never redeliver; the reason (addresses redacted) goes to the server's
// advisory. On a work queue stream the message is deleted.
func Terminate(reason string) Outcome { return Outcome{kind: kindTerminate, reason: reason} }

// DeadLetter: copy the message to otp.dlq.<tenant>, sealed whole under the DLQ key, with
// the reason, its origin and its recipient's hash in headers (deadletter.go), then
// terminate it. If the copy cannot be published, the delivery is retried
// later instead; on its last delivery the consumer keeps it in progress and retries the
// copy for up to MaxInProgress (counted dead_letter_failed if even that fails). An
// invalid tenant becomes "_unknown".
func DeadLetter(tenant, reason string) Outcome {
	return Outcome{kind: kindDeadLetter, tenant: tenant, reason: reason}
}

// Failed: the delivery failed with err and goes back to JetStream as a failure of the
// consumer's own does: redelivered after a delay growing with its deliveries or, on its
// last delivery, dead-lettered with err; data the database refuses is dead-lettered at
// once. For a delivery that must wait its turn without holding the ones after it.
func Failed(err error) Outcome { return Outcome{kind: kindFailed, err: err} }

// String names the outcome as the settle metrics label it.
func (o Outcome) String() string {
	switch o.kind {
	case kindAck:
		return "ack"
	case kindTerminate:
		return "terminate"
	case kindDeadLetter:
		return "dead_letter"
	}
	return "retry"
}

// deadLetterRetry is how long a delivery whose dead-letter copy failed waits to come back.
const deadLetterRetry = 5 * time.Second

// apply is the one place outcomes reach JetStream.
func (c *Consumer) apply(d *Delivery, o Outcome) {
	if o.kind == kindFailed {
		if failureOf(o.err) == failureRefused {
			o = c.refused(d, o.err)
		} else {
			o = c.failed(d, d.meta.NumDelivered, o.err)
		}
	}
	var err error
	applied := o
	switch o.kind {
	case kindAck:
		err = d.msg.Ack()
	case kindTerminate:
		err = d.msg.TermWithReason(events.Reason(o.reason, 200))
	case kindDeadLetter:
		ctx, cancel := context.WithTimeout(context.Background(), PublishTimeout)
		err = c.publishDeadLetter(ctx, d, o.tenant, o.reason)
		cancel()
		switch {
		case err == nil:
			err = d.msg.TermWithReason(events.Reason(o.reason, 200))
		case c.maxDeliver > 0 && d.meta.NumDelivered >= uint64(c.maxDeliver):
			// JetStream would not deliver it again: keep it in progress and keep trying
			// the copy here, so that the message is never dropped without its dead letter.
			c.log.Error("dead-letter copy failed on the last delivery; retrying", "consumer", c.cfg.Name, "seq", d.meta.Sequence, "err", err)
			d.mu.Lock()
			d.lingering = true
			d.mu.Unlock()
			c.beats.add(d)
			go c.retryDeadLetter(d, o)
			return // counted once it lands
		default:
			applied = Retry(deadLetterRetry)
			_ = d.msg.NakWithDelay(deadLetterRetry)
		}
	default:
		after := o.after
		if after <= 0 {
			after = time.Second
		}
		err = d.msg.NakWithDelay(after)
	}
	c.settled.WithLabelValues(c.cfg.Name, applied.String()).Inc()
	if err != nil {
		c.log.Error("settle delivery", "consumer", c.cfg.Name, "seq", d.meta.Sequence, "outcome", o.String(), "err", err)
	}
}

// retryDeadLetter keeps trying the dead-letter copy of d, on its last delivery, with
// backoff for as long as d may stay in progress (MaxInProgress); then it terminates d.
func (c *Consumer) retryDeadLetter(d *Delivery, o Outcome) {
	b := backoff.NewExponentialBackOff(backoff.WithInitialInterval(time.Second), backoff.WithMaxInterval(30*time.Second),
		backoff.WithMaxElapsedTime(c.cfg.MaxInProgress))
	err := backoff.Retry(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), PublishTimeout)
		defer cancel()
		return c.publishDeadLetter(ctx, d, o.tenant, o.reason)
	}, b)
	c.beats.remove(d)
	if err != nil {
		c.settled.WithLabelValues(c.cfg.Name, "dead_letter_failed").Inc()
		c.log.Error("dead-letter copy failed for good; the message is lost to redelivery", "consumer", c.cfg.Name, "seq", d.meta.Sequence, "err", err)
		return
	}
	_ = d.msg.TermWithReason(events.Reason(o.reason, 200))
	c.settled.WithLabelValues(c.cfg.Name, o.String()).Inc()
}

// heartbeats keeps the unsettled deliveries of one consumer in progress, each at most
// maxAge: one goroutine, running only while there is something to keep.
type heartbeats struct {
	every   time.Duration
	maxAge  time.Duration
	onStuck func(*Delivery)
	mu      sync.Mutex
	open    map[*Delivery]time.Time // when it was handed over
	running bool
}

func (h *heartbeats) add(d *Delivery) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.open[d] = time.Now()
	if !h.running {
		h.running = true
		go h.loop()
	}
}

// holds reports whether a delivery of stream sequence seq is open here.
func (h *heartbeats) holds(seq uint64) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for d := range h.open {
		if d.meta.Sequence == seq {
			return true
		}
	}
	return false
}

func (h *heartbeats) remove(d *Delivery) {
	h.mu.Lock()
	delete(h.open, d)
	h.mu.Unlock()
}

func (h *heartbeats) loop() {
	t := time.NewTicker(h.every)
	defer t.Stop()
	var open []*Delivery
	for range t.C {
		h.mu.Lock()
		if len(h.open) == 0 {
			h.running = false
			h.mu.Unlock()
			return
		}
		open = open[:0]
		var stuck []*Delivery
		for d, since := range h.open {
			if time.Since(since) > h.maxAge {
				delete(h.open, d)
				stuck = append(stuck, d)
				continue
			}
			open = append(open, d)
		}
		h.mu.Unlock()
		for _, d := range open {
			d.heartbeat()
		}
		for _, d := range stuck {
			h.onStuck(d)
		}
	}
}

// deliverySet is a set of deliveries safe for concurrent use.
type deliverySet struct {
	mu sync.Mutex
	m  map[*Delivery]struct{}
}

func (s *deliverySet) add(d *Delivery) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[*Delivery]struct{}{}
	}
	s.m[d] = struct{}{}
}

func (s *deliverySet) remove(d *Delivery) {
	s.mu.Lock()
	delete(s.m, d)
	s.mu.Unlock()
}

func (s *deliverySet) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

func (s *deliverySet) all() []*Delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*Delivery, 0, len(s.m))
	for d := range s.m {
		out = append(out, d)
	}
	return out
}
