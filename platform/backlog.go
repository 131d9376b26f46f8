package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/prometheus/client_golang/prometheus"
)

// BacklogWatch watches how long the oldest message a durable consumer has not settled
// yet has waited on its stream, and raises an otp.alert when that nears the stream's
// MaxAge: past it the stream deletes the message unprocessed. It reads only JetStream
// (the consumer's ack floor and the next stored message's timestamp), so it sees a
// consumer that is stuck as well as one that is slow. Any number of processes may run
// it: their alerts about one message share an id, which the stream deduplicates, and
// with a Gate they raise one alert per oldest message and at most one a minute between
// them, restarts included.
type BacklogWatch struct {
	JS       jetstream.JetStream
	Stream   string // e.g. events.StreamRequests
	Consumer string // the durable consumer, e.g. events.ConsumerIssuer
	Filter   string // the consumer's filter subject
	// Bound is the stream's MaxAge; AlertAt the age of the oldest unsettled message
	// that raises the alert (below Bound).
	Bound, AlertAt time.Duration
	// Every is the period of the check (default 10 s).
	Every time.Duration
	// Rule names the alert; Source is its ce-source. Scope, when set, keeps this watch's
	// record in the Gate apart from other watches of the same Rule (the issuer watches a
	// durable per tenant: one tenant's alert must not hold another's back).
	Rule, Source, Scope string
	Log                 *slog.Logger
	// Reg, when set, gets the age gauge and the check counter.
	Reg prometheus.Registerer
	// Gate, when set, is where the processes running the watch record the alerts they
	// raise. Nil, or while it fails (it may sit on the very database that holds the
	// consumer up), each process keeps its own record, in memory.
	Gate AlertGate

	once    sync.Once
	age     prometheus.Gauge
	checks  prometheus.Counter
	alerted uint64    // the oldest message last alerted about
	lastAt  time.Time // when
}

// AlertGate is a record of raised alerts that several processes share. Raise raises rule
// about key (for BacklogWatch: the oldest message) unless it was raised about key before,
// or less than every ago about anything: it calls publish and records the alert, and
// reports whether it did. Two processes never both raise; one whose publish fails records
// nothing. A publish whose record then fails is repeated by the next Raise under the same
// message id, which the stream drops.
type AlertGate interface {
	Raise(ctx context.Context, rule string, key uint64, every time.Duration, publish func(context.Context) error) (bool, error)
}

// alertEvery is the least time between two backlog alerts of one watch.
const alertEvery = time.Minute

// Backlog is what one check found.
type Backlog struct {
	// Unsettled counts messages not yet delivered or delivered and not yet settled.
	Unsettled uint64
	// Oldest is the stream sequence of the oldest unsettled message and Age how long it
	// has been stored; both zero when nothing is unsettled.
	Oldest uint64
	Age    time.Duration
}

func (w *BacklogWatch) init() {
	w.once.Do(func() {
		labels := prometheus.Labels{"stream": w.Stream, "consumer": w.Consumer}
		w.age = prometheus.NewGauge(prometheus.GaugeOpts{Name: "otpflow_consumer_oldest_unsettled_age_seconds",
			Help: "How long the oldest message the consumer has not settled has waited on its stream; 0 when none.", ConstLabels: labels})
		w.checks = prometheus.NewCounter(prometheus.CounterOpts{Name: "otpflow_consumer_backlog_checks_total",
			Help: "Checks of the consumer's oldest unsettled message.", ConstLabels: labels})
		// A watch of a durable this process watched before (an issuer's tenant taken
		// off and added back) finds its gauge and counter registered.
		w.age, w.checks = registerOnce(w.Reg, w.age), registerOnce(w.Reg, w.checks)
		if w.Every <= 0 {
			w.Every = 10 * time.Second
		}
		if w.Log == nil {
			w.Log = slog.New(slog.DiscardHandler)
		}
	})
}

// Run checks every Every until ctx is cancelled. A failed check is logged and retried at
// the next tick.
func (w *BacklogWatch) Run(ctx context.Context) error {
	w.init()
	t := time.NewTicker(w.Every)
	defer t.Stop()
	for {
		if _, err := w.Check(ctx); err != nil && ctx.Err() == nil {
			w.Log.Warn("backlog check", "stream", w.Stream, "consumer", w.Consumer, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Forget takes the watch's gauge and counter out of the registry, once its durable is
// gone: a gauge left at its last age would keep an alert on the consumer firing.
func (w *BacklogWatch) Forget() {
	w.init()
	if w.Reg != nil {
		w.Reg.Unregister(w.age)
		w.Reg.Unregister(w.checks)
	}
}

// Check measures the backlog once, exports its age, and raises the alert when the age
// reached AlertAt: once per oldest message, and at most once a minute (across the
// processes that share the Gate, or in this one). Run calls it; it is not for concurrent
// use.
func (w *BacklogWatch) Check(ctx context.Context) (Backlog, error) {
	w.init()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	b, err := w.measure(ctx)
	if err != nil {
		return b, err
	}
	w.checks.Inc()
	w.age.Set(b.Age.Seconds())
	if b.Age < w.AlertAt {
		return b, nil
	}
	if w.Gate == nil && (b.Oldest == w.alerted || time.Since(w.lastAt) < alertEvery) {
		return b, nil
	}
	now := time.Now().UTC()
	m, err := events.NewMsg(events.TypeAlert, "_system", fmt.Sprintf("alert:%s:%d", w.Rule, b.Oldest), "", events.Alert{
		Tenant: "_system", Rule: w.Rule, Severity: "warning",
		Detail: fmt.Sprintf("the oldest of %d unprocessed messages on %s (consumer %s) has waited %v; the stream deletes messages after %v",
			b.Unsettled, w.Stream, w.Consumer, b.Age.Round(time.Second), w.Bound),
		Value: b.Age.Seconds(), Threshold: w.AlertAt.Seconds(), RaisedAt: now,
	}, events.Envelope{Source: w.Source, Time: now})
	if err != nil {
		return b, err
	}
	var published bool
	var pubErr error
	publish := func(ctx context.Context) error {
		if _, pubErr = w.JS.PublishMsg(ctx, m); pubErr != nil {
			return pubErr
		}
		published = true
		return nil
	}
	if w.Gate != nil {
		// Bounded, so that a record stuck on its database leaves time to publish alone.
		gctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		rule := w.Rule
		if w.Scope != "" {
			rule += "/" + w.Scope
		}
		raised, err := w.Gate.Raise(gctx, rule, b.Oldest, alertEvery, publish)
		cancel()
		switch {
		case pubErr != nil:
			return b, fmt.Errorf("publish alert: %w", pubErr)
		case err == nil && !raised:
			return b, nil // raised already, by this process or another
		case err != nil && !published:
			// The record is out of reach: this process decides alone, as without one.
			w.Log.Warn("backlog alert record", "stream", w.Stream, "consumer", w.Consumer, "err", err)
			if b.Oldest == w.alerted || time.Since(w.lastAt) < alertEvery {
				return b, nil
			}
		}
	}
	if !published {
		if err := publish(ctx); err != nil {
			return b, fmt.Errorf("publish alert: %w", err)
		}
	}
	w.alerted, w.lastAt = b.Oldest, time.Now()
	w.Log.Warn("backlog nears the stream's bound", "stream", w.Stream, "consumer", w.Consumer,
		"oldest_seq", b.Oldest, "age", b.Age.Round(time.Second), "unsettled", b.Unsettled, "bound", w.Bound)
	return b, nil
}

// measure finds the oldest message past the consumer's ack floor: every message at or
// below the floor is settled, the first one above it is not.
func (w *BacklogWatch) measure(ctx context.Context) (Backlog, error) {
	cons, err := w.JS.Consumer(ctx, w.Stream, w.Consumer)
	if err != nil {
		return Backlog{}, err
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return Backlog{}, err
	}
	b := Backlog{Unsettled: info.NumPending + uint64(info.NumAckPending)}
	if b.Unsettled == 0 {
		return b, nil
	}
	st, err := w.JS.Stream(ctx, w.Stream)
	if err != nil {
		return b, err
	}
	m, err := st.GetMsg(ctx, info.AckFloor.Stream+1, jetstream.WithGetMsgSubject(w.Filter))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return Backlog{}, nil // settled or aged out meanwhile
	}
	if err != nil {
		return b, err
	}
	b.Oldest, b.Age = m.Sequence, max(time.Since(m.Time), 0)
	return b, nil
}
