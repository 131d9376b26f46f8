package platform_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

// settleEnv is a JetStream with the contract's streams, a stream of test messages on
// settle.<tenant> and a durable consumer on it.
type settleEnv struct {
	js   jetstream.JetStream
	cons jetstream.Consumer
	reg  *prometheus.Registry
	// dlq seals the consumer's dead letters; subjects hashes their recipients.
	dlq      *keys.Sealer
	subjects *keys.Subjects
}

func newSettleEnv(t *testing.T, cc jetstream.ConsumerConfig) *settleEnv {
	t.Helper()
	_, js := testenv.JetStream(t, testenv.NATS(t))
	_, err := js.CreateStream(t.Context(), jetstream.StreamConfig{Name: "SETTLE", Subjects: []string{"settle.>"}})
	testenv.Must(t, err, "stream")
	cc.Durable = "settle_test"
	cc.AckPolicy = jetstream.AckExplicitPolicy
	cons, err := js.CreateOrUpdateConsumer(t.Context(), "SETTLE", cc)
	testenv.Must(t, err, "consumer")
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subject key")
	return &settleEnv{js: js, cons: cons, reg: prometheus.NewRegistry(), dlq: testenv.DLQKey(t), subjects: subjects}
}

func (e *settleEnv) consumer(size int) *platform.Consumer {
	return platform.NewConsumer(e.cons, platform.ConsumeConfig{Name: "settle_test", BatchSize: size,
		MaxRetryDelay: 200 * time.Millisecond, JS: e.js, Log: testenv.Logger(io.Discard), Reg: e.reg,
		DeadLetters: &platform.DeadLetters{Sealer: e.dlq, Recipient: platform.RequestRecipient(e.subjects)}})
}

// opened is the original message of a dead letter, unsealed.
func (e *settleEnv) opened(t *testing.T, m *jetstream.RawStreamMsg) string {
	t.Helper()
	return string(testenv.OpenDeadLetter(t, e.dlq, m).Data)
}

func (e *settleEnv) publish(t *testing.T, bodies ...string) {
	t.Helper()
	for _, b := range bodies {
		_, err := e.js.Publish(t.Context(), "settle.acme", []byte(b))
		testenv.Must(t, err, "publish %s", b)
	}
}

func (e *settleEnv) fetch(t *testing.T, n int) []jetstream.Msg {
	t.Helper()
	batch, err := e.cons.Fetch(n, jetstream.FetchMaxWait(5*time.Second))
	testenv.Must(t, err, "fetch")
	var msgs []jetstream.Msg
	for m := range batch.Messages() {
		msgs = append(msgs, m)
	}
	if len(msgs) != n {
		t.Fatalf("fetched %d messages, want %d", len(msgs), n)
	}
	return msgs
}

// counter reads one series of a settle metric.
func (e *settleEnv) counter(t *testing.T, name, outcome string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	testenv.Must(t, err, "gather")
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == outcome {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

func (e *settleEnv) waitSettled(t *testing.T) *jetstream.ConsumerInfo {
	t.Helper()
	var info *jetstream.ConsumerInfo
	testenv.Eventually(t, 10*time.Second, "every message settled", func() bool {
		var err error
		info, err = e.cons.Info(t.Context())
		return err == nil && info.NumAckPending == 0 && info.NumPending == 0
	})
	return info
}

// TestDeliverySettlesOnce: the first outcome is applied; a second one, from the same or
// another stage, is ignored and counted.
func TestDeliverySettlesOnce(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Second})
	e.publish(t, "one")
	c := e.consumer(1)
	c.Handle(t.Context(), e.fetch(t, 1), func(_ context.Context, batch []*platform.Delivery) error {
		d := batch[0]
		if string(d.Data()) != "one" || d.Subject() != "settle.acme" || d.Meta().NumDelivered != 1 || d.Meta().Sequence != 1 || d.Meta().Stream != "SETTLE" {
			t.Errorf("delivery %s %q %+v", d.Subject(), d.Data(), d.Meta())
		}
		d.Settle(platform.Ack())
		d.Settle(platform.Retry(time.Millisecond))
		d.Settle(platform.Terminate("again"))
		return nil
	})
	// Settle applies synchronously, and apply is the only path to JetStream: the
	// counters below are final once Handle returned, and they show no retry was sent.
	if info := e.waitSettled(t); info.NumRedelivered != 0 {
		t.Errorf("after the ack: %+v", info)
	}
	if got := e.counter(t, "otpflow_deliveries_settled_total", "ack"); got != 1 {
		t.Errorf("acks counted %v, want 1", got)
	}
	for _, o := range []string{"retry", "terminate"} {
		if got := e.counter(t, "otpflow_deliveries_settled_total", o); got != 0 {
			t.Errorf("%s applied %v times after the ack", o, got)
		}
		if got := e.counter(t, "otpflow_deliveries_settled_again_total", o); got != 1 {
			t.Errorf("ignored %s counted %v, want 1", o, got)
		}
	}
}

// TestHeartbeatsKeepSlowDeliveryFromRedelivery: a delivery settled by another stage long
// after its AckWait is not redelivered meanwhile, while the process keeps it in progress.
func TestHeartbeatsKeepSlowDeliveryFromRedelivery(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: time.Second})
	e.publish(t, "slow")
	c := e.consumer(1)
	var handed atomic.Int32
	settled := make(chan struct{})
	stop := testenv.Start(t, func(ctx context.Context) error {
		return c.Run(ctx, func(_ context.Context, batch []*platform.Delivery) error {
			handed.Add(1)
			go func() {
				time.Sleep(3500 * time.Millisecond) // three and a half AckWaits
				batch[0].Settle(platform.Ack())
				close(settled)
			}()
			return nil
		})
	})
	defer stop()
	select {
	case <-settled:
	case <-time.After(10 * time.Second):
		t.Fatal("not settled")
	}
	info := e.waitSettled(t)
	if n := handed.Load(); n != 1 || info.NumRedelivered != 0 {
		t.Errorf("handed over %d times, %d redelivered; want once, none", n, info.NumRedelivered)
	}
}

// TestForgottenDeliveryIsGivenBackToRedelivery: a delivery no stage ever settles (a hung
// stage, a handler that forgot one) is kept in progress only up to MaxInProgress; then
// JetStream redelivers it, and the consumer counts it.
func TestForgottenDeliveryIsGivenBackToRedelivery(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: time.Second})
	e.publish(t, "forgotten")
	c := platform.NewConsumer(e.cons, platform.ConsumeConfig{Name: "settle_test", MaxInProgress: 2 * time.Second,
		JS: e.js, Log: testenv.Logger(io.Discard), Reg: e.reg})
	var handed atomic.Int32
	stop := testenv.Start(t, func(ctx context.Context) error {
		return c.Run(ctx, func(_ context.Context, batch []*platform.Delivery) error {
			if handed.Add(1) > 1 {
				batch[0].Settle(platform.Ack())
			}
			return nil // the first time: neither settled nor handed to anyone
		})
	})
	defer stop()
	e.waitSettled(t)
	if n := handed.Load(); n != 2 {
		t.Errorf("handed over %d times, want twice (once forgotten, once redelivered)", n)
	}
	mfs, err := e.reg.Gather()
	testenv.Must(t, err, "gather")
	var stuck float64
	for _, mf := range mfs {
		if mf.GetName() == "otpflow_deliveries_stuck_total" {
			stuck = mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	if stuck != 1 {
		t.Errorf("otpflow_deliveries_stuck_total = %v, want 1", stuck)
	}
}

// TestDeadLetterOnTheLastDeliveryWaitsForTheDLQ: when the dead-letter copy cannot be
// written on a message's last delivery (OTP_DLQ is gone for a while), the consumer keeps
// the message in progress and tries again, instead of handing it back to a JetStream that
// will never deliver it again.
func TestDeadLetterOnTheLastDeliveryWaitsForTheDLQ(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: time.Second, MaxDeliver: 1})
	testenv.Must(t, e.js.DeleteStream(t.Context(), events.StreamDLQ), "delete the DLQ")
	e.publish(t, "poison")
	c := e.consumer(1)
	c.Handle(t.Context(), e.fetch(t, 1), func(_ context.Context, batch []*platform.Delivery) error {
		batch[0].Settle(platform.DeadLetter("acme", "cannot be handled"))
		return nil
	})
	// The first copy failed inside Settle; the DLQ comes back.
	_, err := platform.Provision(t.Context(), e.js, events.StreamOptions{})
	testenv.Must(t, err, "provision")
	dl := testenv.WaitMessages(t, e.js, events.StreamDLQ, "otp.dlq.acme", 1, 20*time.Second)
	if e.opened(t, dl[0]) != "poison" || dl[0].Header.Get(events.HeaderDLQReason) != "cannot be handled" {
		t.Fatalf("dead letter %q, reason %q", e.opened(t, dl[0]), dl[0].Header.Get(events.HeaderDLQReason))
	}
	e.waitSettled(t)
	if got := e.counter(t, "otpflow_deliveries_settled_total", "dead_letter"); got != 1 {
		t.Errorf("dead letters counted %v, want 1", got)
	}
}

// TestFailedBatchIsolatesPoison: a handler that fails its batch gets each delivery alone;
// the good ones are acknowledged, the poison one is retried and, on its last delivery,
// dead-lettered with the error.
func TestFailedBatchIsolatesPoison(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Second, MaxDeliver: 2})
	e.publish(t, "a", "b", "poison", "c", "d")
	c := e.consumer(5)
	var mu sync.Mutex
	var calls [][]string
	handler := func(_ context.Context, batch []*platform.Delivery) error {
		var bodies []string
		for _, d := range batch {
			bodies = append(bodies, string(d.Data()))
		}
		mu.Lock()
		calls = append(calls, bodies)
		mu.Unlock()
		if slices.Contains(bodies, "poison") {
			return errors.New("poison in the batch")
		}
		for _, d := range batch {
			d.Settle(platform.Ack())
		}
		return nil
	}
	c.Handle(t.Context(), e.fetch(t, 5), handler)
	want := [][]string{{"a", "b", "poison", "c", "d"}, {"a"}, {"b"}, {"poison"}, {"c"}, {"d"}}
	if fmt.Sprint(calls) != fmt.Sprint(want) {
		t.Errorf("handler calls %v, want %v", calls, want)
	}
	if got := e.counter(t, "otpflow_deliveries_settled_total", "ack"); got != 4 {
		t.Errorf("acks %v, want 4", got)
	}
	if got := e.counter(t, "otpflow_deliveries_settled_total", "retry"); got != 1 {
		t.Errorf("retries %v, want 1", got)
	}

	// The redelivery is its last: dead-lettered instead of retried.
	again := e.fetch(t, 1)
	c.Handle(t.Context(), again, handler)
	dl := testenv.WaitMessages(t, e.js, events.StreamDLQ, "otp.dlq.acme", 1, 10*time.Second)
	if e.opened(t, dl[0]) != "poison" || !strings.Contains(dl[0].Header.Get(events.HeaderDLQReason), "poison in the batch") ||
		dl[0].Header.Get(events.HeaderDLQDelivered) != "2" || dl[0].Header.Get(events.HeaderDLQStream) != "SETTLE" ||
		dl[0].Header.Get(events.HeaderDLQSubject) != "settle.acme" {
		t.Errorf("dead letter %q %v", e.opened(t, dl[0]), dl[0].Header)
	}
	if info := e.waitSettled(t); info.NumAckPending != 0 {
		t.Errorf("left %+v", info)
	}
}

// TestAHandlerThatPanicsIsAFailure: a message on which the handler panics (a bug a
// message can reach) does not take the process down on every delivery until the server
// gives it up unrecorded: the panic fails its batch, the rest of the batch is handled,
// and on its last delivery the message is dead-lettered, saying the handler panicked.
func TestAHandlerThatPanicsIsAFailure(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Second, MaxDeliver: 2})
	e.publish(t, "a", "boom", "b")
	c := e.consumer(3)
	handler := func(_ context.Context, batch []*platform.Delivery) error {
		for _, d := range batch {
			if string(d.Data()) == "boom" {
				panic("index out of range")
			}
		}
		for _, d := range batch {
			d.Settle(platform.Ack())
		}
		return nil
	}
	c.Handle(t.Context(), e.fetch(t, 3), handler)
	if got := e.counter(t, "otpflow_deliveries_settled_total", "ack"); got != 2 {
		t.Errorf("acks %v, want the 2 others", got)
	}
	c.Handle(t.Context(), e.fetch(t, 1), handler)
	dl := testenv.WaitMessages(t, e.js, events.StreamDLQ, "otp.dlq.acme", 1, 10*time.Second)
	if e.opened(t, dl[0]) != "boom" || !strings.Contains(dl[0].Header.Get(events.HeaderDLQReason), "the handler panicked: index out of range") {
		t.Errorf("dead letter %q %v", e.opened(t, dl[0]), dl[0].Header)
	}
	if info := e.waitSettled(t); info.NumAckPending != 0 {
		t.Errorf("left %+v", info)
	}
}

// TestOutcomesCountedAndApplied: each outcome is applied as JetStream knows it and
// counted under its own label; a dead letter carries its reason with addresses redacted.
func TestOutcomesCountedAndApplied(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Second, MaxDeliver: 5})
	e.publish(t, "ack", "retry", "terminate", "dead")
	c := e.consumer(4)
	c.Handle(t.Context(), e.fetch(t, 4), func(_ context.Context, batch []*platform.Delivery) error {
		for _, d := range batch {
			switch string(d.Data()) {
			case "ack":
				d.Settle(platform.Ack())
			case "retry":
				d.Settle(platform.Retry(100 * time.Millisecond))
			case "terminate":
				d.Settle(platform.Terminate("refused"))
			case "dead":
				d.Settle(platform.DeadLetter("acme", "provider said no to ana@example.com"))
			}
		}
		return nil
	})
	for _, o := range []string{"ack", "retry", "terminate", "dead_letter"} {
		if got := e.counter(t, "otpflow_deliveries_settled_total", o); got != 1 {
			t.Errorf("%s counted %v, want 1", o, got)
		}
	}
	dl := testenv.WaitMessages(t, e.js, events.StreamDLQ, "otp.dlq.acme", 1, 10*time.Second)
	if r := dl[0].Header.Get(events.HeaderDLQReason); e.opened(t, dl[0]) != "dead" || strings.Contains(r, "ana@") || !strings.Contains(r, "provider said no") {
		t.Errorf("dead letter %q with reason %q", e.opened(t, dl[0]), r)
	}
	// Only the retried message comes back.
	back := e.fetch(t, 1)
	if string(back[0].Data()) != "retry" {
		t.Errorf("redelivered %q", back[0].Data())
	}
	c.Handle(t.Context(), back, func(_ context.Context, batch []*platform.Delivery) error {
		if n := batch[0].Meta().NumDelivered; n != 2 {
			t.Errorf("delivery %d, want 2", n)
		}
		batch[0].Settle(platform.Ack())
		return nil
	})
	e.waitSettled(t)
}

// A service wraps its durable consumer once and settles each delivery with an outcome;
// platform applies it, keeps the delivery in progress until then, and splits a failed
// batch to find the poison message.
func ExampleConsumer() {
	var cons jetstream.Consumer // from the contract's consumer config
	var js jetstream.JetStream
	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: events.ConsumerAuditor, BatchSize: 100, JS: js})
	_ = c.Run(context.Background(), func(ctx context.Context, batch []*platform.Delivery) error {
		for _, d := range batch {
			if _, tenant, err := events.SplitSubject(d.Subject()); err != nil {
				d.Settle(platform.DeadLetter(tenant, err.Error()))
				continue
			}
			d.Settle(platform.Ack())
		}
		return nil
	})
}

// TestConsumerPullsOnPastAMessageThatLooksLikeAStatus: the JetStream client takes a
// message with an empty body and a Status header for a status of the server, and on 400
// stops pulling. Anyone who may publish to a stream can store one (an app on
// OTP_REQUESTS). The consumer pulls again: the messages after it are handled, and the
// consumer is still running.
func TestConsumerPullsOnPastAMessageThatLooksLikeAStatus(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: time.Second, MaxDeliver: 2})
	e.publish(t, "a", "b")
	for _, status := range []string{"400", "409"} {
		m := nats.NewMsg("settle.acme")
		m.Header.Set("Status", status)
		m.Header.Set("Description", "Consumer Deleted")
		_, err := e.js.PublishMsg(t.Context(), m)
		testenv.Must(t, err, "publish a message that looks like a status")
	}
	e.publish(t, "c", "d")

	var mu sync.Mutex
	var seen []string
	c := platform.NewConsumer(e.cons, platform.ConsumeConfig{Name: "settle_test", MaxRetryDelay: 200 * time.Millisecond, JS: e.js,
		Log: testenv.Logger(io.Discard), Reg: e.reg, DeadLetters: &platform.DeadLetters{Sealer: e.dlq}})
	ctx, cancel := context.WithCancel(context.Background())
	exhausted := e.runExhausted(t, ctx, c)
	ran := make(chan error, 1)
	go func() {
		ran <- c.Run(ctx, func(_ context.Context, batch []*platform.Delivery) error {
			mu.Lock()
			defer mu.Unlock()
			for _, d := range batch {
				seen = append(seen, string(d.Data()))
				d.Settle(platform.Ack())
			}
			return nil
		})
	}()
	testenv.Eventually(t, 30*time.Second, "the messages after the look-alikes handled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Contains(seen, "c") && slices.Contains(seen, "d")
	})
	select {
	case err := <-ran:
		t.Fatalf("the consumer stopped: %v", err)
	default:
	}
	e.publish(t, "e")
	testenv.Eventually(t, 30*time.Second, "a message published later handled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Contains(seen, "e")
	})
	// The look-alikes never reached the handler; once the server gave each up after its
	// deliveries, each is dead-lettered whole, with its consumer and why.
	dl := testenv.WaitMessages(t, e.js, events.StreamDLQ, "otp.dlq.acme", 2, 30*time.Second)
	var deadSeqs []string
	for _, m := range dl {
		orig := testenv.OpenDeadLetter(t, e.dlq, m)
		if len(orig.Data) != 0 || orig.Header["Status"] == nil || m.Header.Get(events.HeaderDLQConsumer) != "settle_test" ||
			!strings.Contains(m.Header.Get(events.HeaderDLQReason), "Status header") || m.Header.Get(events.HeaderDLQDelivered) != "2" {
			t.Errorf("dead letter %v of %+v", m.Header, orig)
		}
		deadSeqs = append(deadSeqs, m.Header.Get(events.HeaderDLQSequence))
	}
	slices.Sort(deadSeqs)
	if !slices.Equal(deadSeqs, []string{"3", "4"}) {
		t.Errorf("dead-lettered sequences %v, want the look-alikes 3 and 4", deadSeqs)
	}
	cancel()
	if err := <-ran; err != nil {
		t.Fatalf("run: %v", err)
	}
	if err := <-exhausted; err != nil {
		t.Fatalf("run exhausted: %v", err)
	}
	mfs, err := e.reg.Gather()
	testenv.Must(t, err, "gather")
	restarts := 0.0
	for _, mf := range mfs {
		if mf.GetName() == "otpflow_consumer_restarts_total" {
			for _, m := range mf.GetMetric() {
				restarts += m.GetCounter().GetValue()
			}
		}
	}
	if restarts < 1 {
		t.Fatalf("restarts counted: %v", restarts)
	}
	t.Logf("handled %v", seen)
}

// runExhausted has OTP_ADVISORIES keep SETTLE's max deliveries advisories too, as it keeps
// OTP_REQUESTS's, and runs platform.RunExhausted for settle_test, whose live consumer, if
// c is set, holds what it holds, until ctx ends; its error comes on the channel.
func (e *settleEnv) runExhausted(t *testing.T, ctx context.Context, c *platform.Consumer) <-chan error {
	t.Helper()
	st, err := e.js.Stream(t.Context(), events.StreamAdvisories)
	testenv.Must(t, err, "advisories")
	cfg := st.CachedInfo().Config
	if advisory := events.MaxDeliveriesAdvisory("SETTLE", "*"); !slices.Contains(cfg.Subjects, advisory) {
		cfg.Subjects = append(cfg.Subjects, advisory)
		_, err = e.js.UpdateStream(t.Context(), cfg)
		testenv.Must(t, err, "capture SETTLE's advisories")
	}
	cc := events.IssuerExhaustedConsumer
	cc.Durable, cc.FilterSubject, cc.AckWait = "settle-exhausted", events.MaxDeliveriesAdvisory("SETTLE", "*"), 2*time.Second
	_, err = e.js.CreateOrUpdateConsumer(t.Context(), events.StreamAdvisories, cc)
	testenv.Must(t, err, "advisory consumer")
	holds := func(string, uint64) bool { return false }
	if c != nil {
		holds = func(durable string, seq uint64) bool { return durable == "settle_test" && c.Holds(seq) }
	}
	done := make(chan error, 1)
	go func() {
		done <- platform.RunExhausted(ctx, platform.ExhaustedConfig{Consumer: cc, Stream: "SETTLE",
			Owns: func(d string) bool { return d == "settle_test" }, Holds: holds, JS: e.js,
			DeadLetters: &platform.DeadLetters{Sealer: e.dlq}, Log: testenv.Logger(io.Discard), Reg: prometheus.NewRegistry()})
	}()
	return done
}

// TestAMessageGivenUpWhileNoServiceListensIsDeadLettered: the process handling a message
// dies on each of its deliveries, and no process of the service is up when the server
// gives the message up (on the next pull, which a process that is about to die, or one
// without the watch, makes): the server's advisory is kept on OTP_ADVISORIES, and the
// service, once back, dead-letters the message whole, with its consumer and why. An
// advisory about another durable, and one about a message since deleted, are
// acknowledged and leave no dead letter. (An advisory heard only on core NATS, by a
// process that died before it wrote the dead letter, would have been lost.)
func TestAMessageGivenUpWhileNoServiceListensIsDeadLettered(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: time.Second, MaxDeliver: 2})
	// OTP_ADVISORIES takes SETTLE's advisories before anything is given up.
	stop, cancel := context.WithCancel(t.Context())
	cancel()
	<-e.runExhausted(t, stop, nil)

	e.publish(t, "dies-twice", "deleted")
	other, err := e.js.CreateOrUpdateConsumer(t.Context(), "SETTLE", jetstream.ConsumerConfig{Durable: "other",
		AckPolicy: jetstream.AckExplicitPolicy, AckWait: time.Second, MaxDeliver: 1, FilterSubject: "settle.acme"})
	testenv.Must(t, err, "another durable")
	// Each delivery taken and never settled, as by a process killed while it handled it.
	// The server gives a message up when a client next pulls, here one whose process
	// then dies before it dead-letters what it was told (or one with no watch at all).
	for range 2 {
		e.fetch(t, 2)
	}
	for _, c := range []jetstream.Consumer{e.cons, other, other} {
		batch, err := c.Fetch(2, jetstream.FetchMaxWait(2*time.Second))
		testenv.Must(t, err, "fetch")
		for m := range batch.Messages() {
			_ = m // not settled
		}
	}
	st, err := e.js.Stream(t.Context(), "SETTLE")
	testenv.Must(t, err, "settle")
	testenv.Eventually(t, 30*time.Second, "the advisories kept while nobody listens", func() bool {
		return len(testenv.Messages(t, e.js, events.StreamAdvisories, "")) == 4
	})
	testenv.Must(t, st.DeleteMsg(t.Context(), 2), "delete the second message")
	if n := len(testenv.Messages(t, e.js, events.StreamDLQ, "")); n != 0 {
		t.Fatalf("%d dead letters before the service is back", n)
	}

	ctx, stopRun := context.WithCancel(t.Context())
	done := e.runExhausted(t, ctx, nil)
	dl := testenv.WaitMessages(t, e.js, events.StreamDLQ, "otp.dlq.acme", 1, 30*time.Second)
	if orig := testenv.OpenDeadLetter(t, e.dlq, dl[0]); string(orig.Data) != "dies-twice" || dl[0].Header.Get(events.HeaderDLQConsumer) != "settle_test" ||
		!strings.Contains(dl[0].Header.Get(events.HeaderDLQReason), "deliveries exhausted (2) with none settled") || dl[0].Header.Get(events.HeaderDLQSequence) != "1" {
		t.Errorf("dead letter %v of %q", dl[0].Header, orig.Data)
	}
	testenv.WaitDrained(t, e.js, events.StreamAdvisories, "settle-exhausted", 4, 30*time.Second)
	if n := len(testenv.Messages(t, e.js, events.StreamDLQ, "")); n != 1 {
		t.Errorf("%d dead letters, want the one of settle_test's live message", n)
	}
	stopRun()
	if err := <-done; err != nil {
		t.Fatalf("run exhausted: %v", err)
	}
}

// TestHoldKeepsThePulledMessagesBehindIt: while a batch is held (its neighbour down), the
// consumer has already pulled the messages behind it. They wait in the process, and must
// stay in progress meanwhile: an outage longer than AckWait × MaxDeliver must not spend
// their deliveries on the server (they would be redelivered, or given up on while only
// the process knew of them). Here AckWait is 1 s and MaxDeliver 3, and the outage lasts
// well past 3 s.
func TestHoldKeepsThePulledMessagesBehindIt(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: time.Second, MaxDeliver: 3})
	e.publish(t, "blocker", "b", "c", "d", "e")
	c := platform.NewConsumer(e.cons, platform.ConsumeConfig{Name: "settle_test", BatchSize: 1, Prefetch: 4,
		MaxRetryDelay: time.Second, JS: e.js, Log: testenv.Logger(io.Discard), Reg: e.reg,
		DeadLetters: &platform.DeadLetters{Sealer: e.dlq, Recipient: platform.RequestRecipient(e.subjects)}})
	var down atomic.Bool
	down.Store(true)
	var mu sync.Mutex
	handled := map[string]int{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() {
		ran <- c.Run(ctx, func(_ context.Context, batch []*platform.Delivery) error {
			if down.Load() {
				return fmt.Errorf("the store: %w", platform.ErrUnavailable)
			}
			mu.Lock()
			defer mu.Unlock()
			for _, d := range batch {
				handled[string(d.Data())]++
				d.Settle(platform.Ack())
			}
			return nil
		})
	}()
	// The outage: held until the consumer has tried again for longer than AckWait ×
	// MaxDeliver (held retries at most 1 s apart, the first after 1 s).
	testenv.Eventually(t, 60*time.Second, "the batch held through six tries", func() bool {
		return e.total(t, "otpflow_deliveries_held_retries_total") >= 6
	})
	info, err := e.cons.Info(t.Context())
	testenv.Must(t, err, "consumer info")
	if info.NumRedelivered != 0 || info.NumAckPending != 5 {
		t.Fatalf("during the outage: %d redelivered, %d pending, want 0 and 5 (all kept in progress)", info.NumRedelivered, info.NumAckPending)
	}
	down.Store(false)
	testenv.Eventually(t, 30*time.Second, "all handled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(handled) == 5
	})
	testenv.Eventually(t, 30*time.Second, "all acknowledged", func() bool {
		info, err := e.cons.Info(t.Context())
		return err == nil && info.NumAckPending == 0 && info.AckFloor.Stream == 5
	})
	for body, n := range handled {
		if n != 1 {
			t.Errorf("%s handled %d times", body, n)
		}
	}
	if n := e.total(t, "otpflow_deliveries_settled_total"); n != 5 {
		t.Errorf("%v settled, want the 5 acks", n)
	}
	cancel()
	testenv.Must(t, <-ran, "run")
}

// total sums every series of a metric.
func (e *settleEnv) total(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	testenv.Must(t, err, "gather")
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// TestARefusalIsTriedOnceMoreAlone: a unique violation can be a race (a replica, or the
// copy of a redelivery, inserted the same key a moment before), not bad data. A delivery
// the database refuses is tried once more alone before it goes to the DLQ: one refused
// once is handled; one refused every time is dead-lettered.
func TestARefusalIsTriedOnceMoreAlone(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Second, MaxDeliver: 3})
	e.publish(t, "race", "bad", "fine")
	c := e.consumer(3)
	var mu sync.Mutex
	tries, handled := map[string]int{}, map[string]bool{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() {
		ran <- c.Run(ctx, func(_ context.Context, batch []*platform.Delivery) error {
			mu.Lock()
			defer mu.Unlock()
			for _, d := range batch {
				body := string(d.Data())
				tries[body]++
				if body == "bad" || (body == "race" && tries[body] <= 2) { // in the batch, then alone
					return &pgconn.PgError{Code: "23505", ConstraintName: "requests_pkey", Message: "duplicate key value"}
				}
			}
			for _, d := range batch {
				handled[string(d.Data())] = true
				d.Settle(platform.Ack())
			}
			return nil
		})
	}()
	testenv.Eventually(t, 30*time.Second, "race and fine handled, bad dead-lettered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return handled["race"] && handled["fine"] && e.counter(t, "otpflow_deliveries_settled_total", "dead_letter") == 1
	})
	if handled["bad"] {
		t.Fatal("bad data handled")
	}
	dl := testenv.Messages(t, e.js, events.StreamDLQ, "")
	if len(dl) != 1 || e.opened(t, dl[0]) != "bad" {
		t.Fatalf("dead letters: %d", len(dl))
	}
	cancel()
	testenv.Must(t, <-ran, "run")
}

// TestConsumerEndsWhenItsDurableIsDeleted: the durable a consumer reads is deleted under
// it (as provisioning retires an issuer durable). The client takes that for a terminal
// status, as it takes a stored look-alike (TestConsumerPullsOnPastAMessageThatLooksLikeAStatus,
// where the consumer pulls on); here the server confirms the durable is gone, and Run
// ends with an error that says so instead of pulling from nothing, while the durable's
// lag leaves the scrape.
func TestConsumerEndsWhenItsDurableIsDeleted(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Second})
	var handled atomic.Int64
	c := e.consumer(1)
	ended := make(chan error, 1)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go func() {
		ended <- c.Run(ctx, func(_ context.Context, batch []*platform.Delivery) error {
			for _, d := range batch {
				handled.Add(1)
				d.Settle(platform.Ack())
			}
			return nil
		})
	}()
	e.publish(t, "before")
	testenv.Eventually(t, 10*time.Second, "the first message handled", func() bool { return handled.Load() == 1 })

	testenv.Must(t, e.js.DeleteConsumer(t.Context(), "SETTLE", e.cons.CachedInfo().Name), "delete the durable")
	select {
	case err := <-ended:
		if !errors.Is(err, jetstream.ErrConsumerNotFound) {
			t.Fatalf("Run ended with %v, want the durable not found", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run goes on pulling from a durable that is gone")
	}
	_, err := e.reg.Gather()
	testenv.Must(t, err, "gather once the durable is gone")
}

// TestLingerFillsTheBatch: with Linger, a delivery that arrives alone waits for the ones
// that follow it, and the batch goes when it is full, not when the linger ends (a minute
// here); without Linger, it would go alone at once. A batch that never fills goes after
// its linger.
func TestLingerFillsTheBatch(t *testing.T) {
	for _, tc := range []struct {
		name    string
		linger  time.Duration
		publish int
	}{{"fills", time.Minute, 4}, {"goes after the linger", 50 * time.Millisecond, 1}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Minute})
			c := platform.NewConsumer(e.cons, platform.ConsumeConfig{Name: "settle_test", BatchSize: 4, Linger: tc.linger,
				JS: e.js, Log: testenv.Logger(io.Discard), Reg: e.reg})
			var mu sync.Mutex
			var sizes []int
			testenv.Start(t, func(ctx context.Context) error {
				return c.Run(ctx, func(_ context.Context, batch []*platform.Delivery) error {
					mu.Lock()
					sizes = append(sizes, len(batch))
					mu.Unlock()
					for _, d := range batch {
						d.Settle(platform.Ack())
					}
					return nil
				})
			})
			e.publish(t, "1")
			// The first is pulled (pending its ack) before the others are published.
			testenv.Eventually(t, 10*time.Second, "the first message delivered", func() bool {
				info, err := e.cons.Info(t.Context())
				return err == nil && info.Delivered.Consumer == 1
			})
			for i := 2; i <= tc.publish; i++ {
				e.publish(t, fmt.Sprint(i))
			}
			e.waitSettled(t)
			mu.Lock()
			defer mu.Unlock()
			if !slices.Equal(sizes, []int{tc.publish}) {
				t.Errorf("batches of %v, want one of %d", sizes, tc.publish)
			}
		})
	}
}

// TestLingerEndsOnShutdown: a service stopped while a batch lingers (for a minute here)
// hands the batch over and returns, rather than wait the linger out.
func TestLingerEndsOnShutdown(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Minute})
	c := platform.NewConsumer(e.cons, platform.ConsumeConfig{Name: "settle_test", BatchSize: 4, Linger: time.Minute,
		JS: e.js, Log: testenv.Logger(io.Discard), Reg: e.reg})
	var handled atomic.Int64
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- c.Run(ctx, func(_ context.Context, batch []*platform.Delivery) error {
			handled.Add(int64(len(batch)))
			for _, d := range batch {
				d.Settle(platform.Ack())
			}
			return nil
		})
	}()
	e.publish(t, "1")
	// In the consumer's hands, not only sent by the server: a message still on the wire
	// at shutdown is the server's to deliver again.
	testenv.Eventually(t, 10*time.Second, "the message pulled", func() bool { return c.Waiting() == 1 })
	if handled.Load() != 0 {
		t.Fatal("the batch did not linger")
	}
	cancel()
	var err error
	testenv.Eventually(t, 10*time.Second, "Run returned", func() bool {
		select {
		case err = <-done:
			return true
		default:
			return false
		}
	})
	testenv.Must(t, err, "run")
	if handled.Load() != 1 {
		t.Errorf("%d deliveries handed over at shutdown, want the 1 that lingered", handled.Load())
	}
}
