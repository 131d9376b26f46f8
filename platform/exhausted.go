package platform

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/prometheus/client_golang/prometheus"
)

// A message can spend its deliveries without the handler settling its last one: the
// process handling it died, or the JetStream client never handed it over. The client
// takes a message with an empty body and a Status header for a status of the server, and
// an app can publish one: Run pulls on past it (see there), and the server gives it up
// after MaxDeliver, telling so only in an advisory. OTP_ADVISORIES keeps those
// advisories (events.StreamAdvisories), so none is lost while no process of the service
// listens, and RunExhausted reads them through the service's durable there, reads each
// message from its stream by sequence and dead-letters it like any other.

// maxDeliveries is the advisory's body (io.nats.jetstream.advisory.v1.max_deliver).
type maxDeliveries struct {
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries uint64 `json:"deliveries"`
}

// ExhaustedConfig is what RunExhausted reads and whose messages it dead-letters.
type ExhaustedConfig struct {
	// Consumer is the service's durable on OTP_ADVISORIES
	// (events.IssuerExhaustedConsumer); Stream the stream its advisories are about.
	Consumer jetstream.ConsumerConfig
	Stream   string
	// Owns reports whether durable, named by an advisory, is one of the service's: the
	// advisories of another are acknowledged and left alone.
	Owns func(durable string) bool
	// Holds reports whether a process's live delivery of durable holds stream sequence
	// seq: the server gave it up while a stage works on it (its heartbeats lost), and the
	// stage settles it. Nil: none does.
	Holds func(durable string, seq uint64) bool
	// Redeliver, when set, is handed each given-up message in place of its dead letter:
	// m, read from its stream, given up after deliveries deliveries, and advisory, the
	// advisory's delivery, which settling what Redeliver starts settles
	// (Consumer.Redelivered). An error gives the advisory back, to be tried again.
	Redeliver func(ctx context.Context, m *jetstream.RawStreamMsg, deliveries uint64, advisory *Delivery) error
	// MaxInProgress bounds how long an advisory is kept in progress while what it
	// handed over runs (ConsumeConfig.MaxInProgress).
	MaxInProgress time.Duration
	// Missing, when set, is told err while cfg.Consumer cannot be bound or read (a
	// *MissingError when it is not provisioned, or deleted), and nil once it is bound;
	// CheckEvery is how often it is tried again (default 5 s).
	Missing    func(err error)
	CheckEvery time.Duration
	// JS reads the messages and publishes the dead letters; DeadLetters seals them.
	JS          jetstream.JetStream
	DeadLetters *DeadLetters
	Log         *slog.Logger
	Reg         prometheus.Registerer
}

// RunExhausted dead-letters, until ctx ends, every message of cfg.Stream that a durable
// cfg.Owns gave up after its MaxDeliver deliveries with none settled, from the server's
// advisories on OTP_ADVISORIES, read through cfg.Consumer. The dead letter's id is the
// message's stream and sequence, as the handler's own would be, so a message the
// handler dead-lettered too is one entry. An advisory is acknowledged once its message
// is dead-lettered, or found gone from its stream (deleted by an erasure, or aged out);
// while NATS does not answer it is tried again, across restarts. An advisory that is
// not understood is dead-lettered itself. In deploy/nats only the server can publish an
// advisory there (no user logs into the streams' account); where every client may
// publish anything (one account without permissions), so may a forged one, as any event.
// Until cfg.Consumer can be bound and read (a provisioning, or NATS permissions, of an
// earlier release; deleted; NATS away), it tries again every cfg.CheckEvery, telling
// cfg.Missing, and returns only when ctx ends.
func RunExhausted(ctx context.Context, cfg ExhaustedConfig) error {
	every := cfg.CheckEvery
	if every <= 0 {
		every = 5 * time.Second
	}
	for {
		cons, err := Bind(ctx, cfg.JS, events.StreamAdvisories, cfg.Consumer)
		if err == nil {
			if cfg.Missing != nil {
				cfg.Missing(nil)
			}
			err = runExhausted(ctx, cons, cfg)
		}
		if ctx.Err() != nil {
			return nil
		}
		// Whatever kept it from reading (not provisioned yet, deleted, not in the NATS
		// permissions yet during a rollout, NATS away past the setup timeout), the
		// service goes on without it and tries again.
		if cfg.Missing != nil {
			cfg.Missing(err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(every):
		}
	}
}

// runExhausted is RunExhausted on cons, bound; it ends with an error wrapping
// jetstream.ErrConsumerNotFound when cons is deleted.
func runExhausted(ctx context.Context, cons jetstream.Consumer, cfg ExhaustedConfig) error {
	size := 10
	if cfg.Redeliver != nil {
		// One at a time: a handover started is settled by the service's stages, and must
		// not be run again because an advisory after it in the batch failed.
		size = 1
	}
	c := NewConsumer(cons, ConsumeConfig{Name: cfg.Consumer.Durable, BatchSize: size, JS: cfg.JS, Log: cfg.Log, Reg: cfg.Reg,
		DeadLetters: cfg.DeadLetters, MaxInProgress: cfg.MaxInProgress, NoRecover: cfg.Redeliver != nil})
	return c.Run(ctx, func(ctx context.Context, batch []*Delivery) error {
		for _, d := range batch {
			if err := c.exhausted(ctx, cfg, d); err != nil {
				return err
			}
		}
		return nil
	})
}

// exhausted handles one advisory d of RunExhausted; an error leaves it and the rest of
// the batch to be tried again.
func (c *Consumer) exhausted(ctx context.Context, cfg ExhaustedConfig, d *Delivery) error {
	var a maxDeliveries
	if err := json.Unmarshal(d.Data(), &a); err != nil || a.Stream != cfg.Stream || a.StreamSeq == 0 || a.Consumer == "" ||
		d.Subject() != events.MaxDeliveriesAdvisory(a.Stream, a.Consumer) {
		d.Settle(DeadLetter("", fmt.Sprintf("%s: a max deliveries advisory not understood", cfg.Consumer.Durable)))
		return nil
	}
	if cfg.Owns != nil && !cfg.Owns(a.Consumer) {
		d.Settle(Ack())
		return nil
	}
	if cfg.Holds != nil && cfg.Holds(a.Consumer, a.StreamSeq) {
		// Given up while a stage here works on it (its heartbeats lost): the stage
		// settles it. (Should the stage then give it back, on shutdown or past
		// MaxInProgress, the server delivers it no more and nothing here sees it again.)
		c.log.Warn("message given up by the server while this process holds it; left to its stage", "consumer", a.Consumer, "seq", a.StreamSeq)
		d.Settle(Ack())
		return nil
	}
	m, err := GetMsg(ctx, cfg.JS, a.Stream, a.StreamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		// Deleted (an erasure) or aged out since: nothing left to keep.
		c.log.Warn("message given up after its deliveries is gone from its stream", "consumer", a.Consumer, "seq", a.StreamSeq)
		d.Settle(Ack())
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s %d: %w", a.Stream, a.StreamSeq, err)
	}
	if cfg.Redeliver != nil {
		c.log.Warn("message given up after its deliveries with none settled; handing it over once more", "consumer", a.Consumer, "seq", a.StreamSeq)
		return cfg.Redeliver(ctx, m, a.Deliveries, d)
	}
	reason := fmt.Sprintf("%s: deliveries exhausted (%d) with none settled: the process handling the last one stopped", a.Consumer, a.Deliveries)
	if looksLikeStatus(m.Header, m.Data) {
		reason = fmt.Sprintf("%s: never handled: an empty message with a Status header, which the client takes for a status of the server; given up after %d deliveries",
			a.Consumer, a.Deliveries)
	}
	_, tenant, _ := events.SplitSubject(m.Subject)
	dl, err := c.cfg.DeadLetters.sealDeadLetter(a.Consumer, tenant, m.Subject, m.Header, m.Data,
		Meta{Stream: a.Stream, Sequence: a.StreamSeq, NumDelivered: a.Deliveries, Timestamp: m.Time}, reason)
	if err != nil {
		return err
	}
	if _, err := cfg.JS.PublishMsg(ctx, dl); err != nil {
		return fmt.Errorf("dead-letter %s: %w", dl.Header.Get(jetstream.MsgIDHeader), err)
	}
	c.settled.WithLabelValues(a.Consumer, "dead_letter").Inc()
	c.log.Warn("message given up after its deliveries dead-lettered", "consumer", a.Consumer, "seq", a.StreamSeq, "reason", reason)
	d.Settle(Ack())
	return nil
}

// Holds reports whether a delivery of stream sequence seq is open in this consumer: handed
// to its handler or waiting to be, and not settled yet.
func (c *Consumer) Holds(seq uint64) bool { return c.beats.holds(seq) }

// looksLikeStatus reports whether a stored message is one the JetStream client takes for
// a status of the server: no body, and a Status header.
func looksLikeStatus(h nats.Header, data []byte) bool {
	return len(data) == 0 && h.Get("Status") != ""
}

// Redelivered returns a Delivery of m, a message of c's work-queue stream that the server
// gave up after deliveries deliveries with none settled (a process died on the last),
// as one more delivery, its last (NumDelivered past MaxDeliver): advisory is the
// delivery of the server's advisory that told so (RunExhausted with
// ExhaustedConfig.Redeliver). Settling it settles advisory: Ack, Terminate and a
// DeadLetter delete m from its stream, as their acknowledgement would have on the work
// queue, then acknowledge advisory; a Retry gives advisory back, to hand m over again
// after the delay. Until then the advisory's consumer keeps advisory in progress.
func (c *Consumer) Redelivered(m *jetstream.RawStreamMsg, stream string, deliveries uint64, advisory *Delivery) *Delivery {
	sm := &storedMsg{m: m, stream: stream, js: c.cfg.JS, advisory: advisory,
		md: &jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: m.Sequence}, NumDelivered: deliveries + 1,
			Stream: stream, Consumer: c.durable, Timestamp: m.Time}}
	return &Delivery{msg: sm, c: c, meta: Meta{Stream: stream, Sequence: m.Sequence, NumDelivered: deliveries + 1, Timestamp: m.Time}}
}

// HandedOverAgain reports whether d came from Redelivered: a Retry of it gives its
// advisory back, so a service that stops may hand it back rather than give it up.
func (d *Delivery) HandedOverAgain() bool {
	_, ok := d.msg.(*storedMsg)
	return ok
}

// storedMsg is a message read from its stream by sequence, settled through the advisory
// that handed it over (Consumer.Redelivered).
type storedMsg struct {
	m        *jetstream.RawStreamMsg
	stream   string
	js       jetstream.JetStream
	advisory *Delivery
	md       *jetstream.MsgMetadata
}

func (s *storedMsg) Metadata() (*jetstream.MsgMetadata, error) { return s.md, nil }
func (s *storedMsg) Data() []byte                              { return s.m.Data }
func (s *storedMsg) Headers() nats.Header                      { return s.m.Header }
func (s *storedMsg) Subject() string                           { return s.m.Subject }
func (s *storedMsg) Reply() string                             { return "" }
func (s *storedMsg) InProgress() error                         { return nil } // the advisory's consumer keeps it
func (s *storedMsg) Nak() error                                { return s.NakWithDelay(time.Second) }
func (s *storedMsg) Term() error                               { return s.Ack() }
func (s *storedMsg) TermWithReason(string) error               { return s.Ack() }
func (s *storedMsg) DoubleAck(context.Context) error           { return s.Ack() }

// NakWithDelay gives the advisory back: m is handed over again after delay.
func (s *storedMsg) NakWithDelay(delay time.Duration) error {
	s.advisory.Settle(Retry(delay))
	return nil
}

// Ack deletes m from its stream, then acknowledges the advisory. If the delete fails, the
// advisory comes back and m is handed over again (its outcome is then found settled).
func (s *storedMsg) Ack() error {
	ctx, cancel := context.WithTimeout(context.Background(), PublishTimeout)
	defer cancel()
	st, err := s.js.Stream(ctx, s.stream)
	if err == nil {
		err = st.DeleteMsg(ctx, s.m.Sequence)
	}
	if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		s.advisory.Settle(Retry(deadLetterRetry))
		return fmt.Errorf("delete %s %d: %w", s.stream, s.m.Sequence, err)
	}
	s.advisory.Settle(Ack())
	return nil
}
