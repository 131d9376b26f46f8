package platform

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// A message can spend its deliveries without the handler settling its last one: the
// process handling it died, or the JetStream client never handed it over. The client
// takes a message with an empty body and a Status header for a status of the server, and
// an app can publish one: Run pulls on past it (see there), and the server gives it up
// after MaxDeliver, telling so only in an advisory. With ConsumeConfig.DeadLetterExhausted
// the consumer listens for that advisory, reads the message from its stream by sequence
// and dead-letters it like any other. The advisory is core NATS: one given while no
// process of the service listens is lost, and the server has moved on past the message.

// MaxDeliveriesAdvisory is the subject on which the server tells that durable of stream
// gave a message up after its MaxDeliver deliveries. deploy/nats exports it to the
// services that use DeadLetterExhausted.
func MaxDeliveriesAdvisory(stream, durable string) string {
	return "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + stream + "." + durable
}

// maxDeliveries is the advisory's body (io.nats.jetstream.advisory.v1.max_deliver).
type maxDeliveries struct {
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries uint64 `json:"deliveries"`
}

// exhaustedTimeout bounds the work on one advisory: reading the message and writing its
// dead letter, retried while NATS does not answer.
const exhaustedTimeout = 2 * time.Minute

// exhaustedWorkers dead-letter given-up messages, from a queue of exhaustedQueue.
const (
	exhaustedWorkers = 4
	exhaustedQueue   = 1024
)

// exhausted is the advisory watch of one Run: its subscription and the workers that
// dead-letter what it hears.
type exhausted struct {
	sub   *nats.Subscription
	queue chan maxDeliveries
	wg    sync.WaitGroup
	mu    sync.Mutex
	seen  map[uint64]bool // sequences queued or done by this process
}

// stop unsubscribes and waits, at most wait, for the dead letters under way.
func (x *exhausted) stop(wait time.Duration) {
	_ = x.sub.Unsubscribe()
	close(x.queue)
	done := make(chan struct{})
	go func() { x.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(wait):
	}
}

// watchExhausted subscribes to the advisories of c's durable, in a queue group, so one
// process of the service handles each, and starts the workers. The advisory is core NATS:
// one given while no process of the service listens is lost (the server then moved on).
// In deploy/nats only the server can publish it (it is exported from the streams'
// account, where no user logs in); where every client may publish anything (one account
// without permissions), so may a forged one, as any event.
func (c *Consumer) watchExhausted(ctx context.Context) (*exhausted, error) {
	info := c.cons.CachedInfo()
	if info == nil {
		return nil, errors.New("dead-letter exhausted messages: the consumer's info is unknown")
	}
	stream, durable := info.Stream, info.Name
	work := context.WithoutCancel(ctx)
	x := &exhausted{queue: make(chan maxDeliveries, exhaustedQueue), seen: map[uint64]bool{}}
	for range exhaustedWorkers {
		x.wg.Add(1)
		go func() {
			defer x.wg.Done()
			for a := range x.queue {
				c.deadLetterExhausted(work, a)
			}
		}()
	}
	sub, err := c.cfg.JS.Conn().QueueSubscribe(MaxDeliveriesAdvisory(stream, durable), "otpflow-"+durable, func(m *nats.Msg) {
		var a maxDeliveries
		if err := json.Unmarshal(m.Data, &a); err != nil || a.Stream != stream || a.Consumer != durable || a.StreamSeq == 0 {
			c.log.Warn("max deliveries advisory not understood", "consumer", c.cfg.Name, "body", events.Reason(string(m.Data), 200))
			return
		}
		// A delivery this process still holds was given up by the server while a stage
		// works on it (its heartbeats lost): the stage settles it, or it comes back.
		if c.beats.holds(a.StreamSeq) {
			c.log.Warn("message given up by the server while this process holds it; left to its stage", "consumer", c.cfg.Name, "seq", a.StreamSeq)
			return
		}
		x.mu.Lock()
		dup := x.seen[a.StreamSeq]
		x.seen[a.StreamSeq] = true
		x.mu.Unlock()
		if dup {
			return
		}
		select {
		case x.queue <- a:
		default:
			c.log.Error("message given up after its deliveries not dead-lettered: too many at once", "consumer", c.cfg.Name, "seq", a.StreamSeq)
		}
	})
	if err != nil {
		close(x.queue)
		return nil, err
	}
	x.sub = sub
	return x, nil
}

// deadLetterExhausted reads the message a advisory names and dead-letters it. The dead
// letter's id is the message's stream and sequence, the same as the handler's own would
// have, so a message the handler dead-lettered too is one entry.
func (c *Consumer) deadLetterExhausted(ctx context.Context, a maxDeliveries) {
	ctx, cancel := context.WithTimeout(ctx, exhaustedTimeout)
	defer cancel()
	var m *jetstream.RawStreamMsg
	err := backoff.Retry(func() error {
		st, err := c.cfg.JS.Stream(ctx, a.Stream)
		if err != nil {
			return err
		}
		m, err = st.GetMsg(ctx, a.StreamSeq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return backoff.Permanent(err)
		}
		return err
	}, backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxInterval(5*time.Second)), ctx))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		// Deleted (an erasure) or aged out since: nothing left to keep.
		c.log.Warn("message given up after its deliveries is gone from its stream", "consumer", c.cfg.Name, "seq", a.StreamSeq)
		return
	}
	if err != nil {
		c.log.Error("message given up after its deliveries not dead-lettered: cannot read it", "consumer", c.cfg.Name, "seq", a.StreamSeq, "err", err)
		return
	}
	reason := fmt.Sprintf("deliveries exhausted (%d) with none settled: the process handling the last one stopped", a.Deliveries)
	if looksLikeStatus(m.Header, m.Data) {
		reason = fmt.Sprintf("never handled: an empty message with a Status header, which the client takes for a status of the server; given up after %d deliveries",
			a.Deliveries)
	}
	_, tenant, _ := events.SplitSubject(m.Subject)
	dl, err := c.cfg.DeadLetters.sealDeadLetter(c.durable, tenant, m.Subject, m.Header, m.Data,
		Meta{Stream: a.Stream, Sequence: a.StreamSeq, NumDelivered: a.Deliveries, Timestamp: m.Time}, reason)
	if err != nil {
		c.log.Error("message given up after its deliveries not dead-lettered", "consumer", c.cfg.Name, "seq", a.StreamSeq, "err", err)
		return
	}
	err = backoff.Retry(func() error {
		_, err := c.cfg.JS.PublishMsg(ctx, dl)
		return err
	}, backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxInterval(5*time.Second)), ctx))
	if err != nil {
		c.log.Error("message given up after its deliveries not dead-lettered", "consumer", c.cfg.Name, "seq", a.StreamSeq, "err", err)
		return
	}
	c.settled.WithLabelValues(c.cfg.Name, "dead_letter").Inc()
	c.log.Warn("message given up after its deliveries dead-lettered", "consumer", c.cfg.Name, "seq", a.StreamSeq, "reason", reason)
}

// looksLikeStatus reports whether a stored message is one the JetStream client takes for
// a status of the server: no body, and a Status header.
func looksLikeStatus(h nats.Header, data []byte) bool {
	return len(data) == 0 && h.Get("Status") != ""
}
