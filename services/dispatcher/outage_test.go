package dispatcher

import (
	"context"
	"io"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// pgProxy is a TCP proxy between the dispatcher and PostgreSQL that a test can cut: a cut
// closes every connection through it and refuses new ones (accepted and closed at once)
// until Restore, as a database restart or a network partition does.
type pgProxy struct {
	ln      net.Listener
	target  string
	refused atomic.Int64 // connections refused while cut

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]bool
}

// startProxy proxies a loopback port to the test server's PostgreSQL until cleanup.
func startProxy(t *testing.T) *pgProxy {
	t.Helper()
	u, err := url.Parse(testenv.AdminDatabaseURL())
	testenv.Must(t, err, "database URL")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	p := &pgProxy{ln: ln, target: u.Host, conns: map[net.Conn]bool{}}
	go p.serve()
	t.Cleanup(func() {
		ln.Close()
		p.Cut()
	})
	return p
}

// route is url with the proxy in place of the server.
func (p *pgProxy) route(dbURL string) string {
	u, err := url.Parse(dbURL)
	if err != nil {
		panic(err)
	}
	u.Host = p.ln.Addr().String()
	return u.String()
}

func (p *pgProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.pipe(c)
	}
}

func (p *pgProxy) pipe(c net.Conn) {
	up, err := net.Dial("tcp", p.target)
	p.mu.Lock()
	if p.cut || err != nil {
		p.mu.Unlock()
		p.refused.Add(1)
		c.Close()
		if up != nil {
			up.Close()
		}
		return
	}
	p.conns[c], p.conns[up] = true, true
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	<-done
	c.Close()
	up.Close()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
}

// Cut drops every connection and refuses new ones.
func (p *pgProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = true
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// Restore lets connections through again.
func (p *pgProxy) Restore() {
	p.mu.Lock()
	p.cut = false
	p.mu.Unlock()
}

// consumer is the dispatcher's durable consumer as the server sees it now.
func (h *harness) consumer(t *testing.T) *jetstream.ConsumerInfo {
	t.Helper()
	c, err := h.js.Consumer(context.Background(), events.StreamDispatch, events.ConsumerDispatcher)
	testenv.Must(t, err, "dispatcher consumer")
	info, err := c.Info(context.Background())
	testenv.Must(t, err, "consumer info")
	return info
}

// settled counts the dispatcher's deliveries settled with outcome (ack, retry, terminate,
// dead_letter), as platform's consumer counts them.
func (h *harness) settled(t *testing.T, outcome string) float64 {
	t.Helper()
	mfs, err := h.reg.Gather()
	testenv.Must(t, err, "gather metrics")
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "otpflow_deliveries_settled_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["consumer"] == events.ConsumerDispatcher && labels["outcome"] == outcome {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}

// waitAcked waits until the work queue is empty and the one job was acknowledged.
func (h *harness) waitAcked(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, 15*time.Second, "the job to be acknowledged", func() bool {
		return h.settled(t, "ack") == 1 && len(testenv.Messages(t, h.js, events.StreamDispatch, "")) == 0
	})
}

// TestSendIsRecordedAfterADatabaseOutage: the provider accepts the mail and the database
// goes away before the dispatcher can record it, for longer than the claim's lease. The
// dispatcher keeps the job in progress and retries the record until the database answers,
// then reports and acknowledges it: one mail, one otp.delivered, one delivery of the job.
// Handed back to the broker instead, the job would be claimed again once the lease lapsed
// and mailed a second time.
func TestSendIsRecordedAfterADatabaseOutage(t *testing.T) {
	proxy := startProxy(t)
	h := newHarnessRoute(t, Config{Lease: 2 * time.Second}, smtpOnly, proxy.route)
	admin := testenv.Admin(t, h.pool)
	var accepted atomic.Int32
	h.smtp.SetAccept(func(testenv.Mail) {
		if accepted.Add(1) == 1 {
			proxy.Cut() // before the relay's 250 reaches the dispatcher
		}
	})
	c := challenge(41)
	h.publish(t, c, "rec@example.com", "707070", time.Now().Add(5*time.Minute), "rec1")
	h.smtp.WaitFor(t, 1, 10*time.Second)

	// The database stays away until the dispatcher has tried it a few times and the
	// lease of its claim has lapsed, so that only the kept job stands between a
	// redelivery and a second mail.
	testenv.Eventually(t, 15*time.Second, "failed connections and a lapsed lease", func() bool {
		var lapsed bool
		err := admin.QueryRow(context.Background(), `SELECT lease_until < clock_timestamp() FROM dispatcher.deliveries
			WHERE challenge_id = $1 AND code_seq = 1 AND status = 'sending'`, c).Scan(&lapsed)
		return err == nil && lapsed && proxy.refused.Load() >= 3
	})
	proxy.Restore()

	d := decode[events.Delivered](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", 1, 15*time.Second)[0])
	h.waitAcked(t)
	if n := len(h.smtp.Mails()); n != 1 {
		t.Fatalf("%d mails for one code after a database outage; a known success was sent again", n)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.delivered.acme")); n != 1 || d.ChallengeID != c || d.Attempts != 1 {
		t.Fatalf("%d delivered events, the first %+v; want one, on attempt 1", n, d)
	}
	if info := h.consumer(t); info.Delivered.Consumer != 1 || info.NumAckPending != 0 {
		t.Fatalf("the job was delivered %d times (%d unacknowledged); it should have been kept in progress", info.Delivered.Consumer, info.NumAckPending)
	}
	var status string
	testenv.Must(t, admin.QueryRow(context.Background(), `SELECT status FROM dispatcher.deliveries WHERE challenge_id = $1`, c).Scan(&status), "read the row")
	if status != statusSent || testutil.ToFloat64(h.svc.recordRetries) == 0 {
		t.Fatalf("row %q after %v record retries", status, testutil.ToFloat64(h.svc.recordRetries))
	}
}

// TestClaimFailingOnTheLastDeliveryIsRetried: on a job's last delivery (MaxDeliver 1) the
// database refuses the claim. JetStream will not deliver the job again, so the dispatcher
// keeps it and claims again once the database is back, then mails it: nothing dead-lettered
// without its outcome, nothing lost.
func TestClaimFailingOnTheLastDeliveryIsRetried(t *testing.T) {
	proxy := startProxy(t)
	h := newHarnessRoute(t, Config{MaxDeliver: 1}, smtpOnly, proxy.route)
	proxy.Cut()
	before := proxy.refused.Load()
	h.publish(t, challenge(42), "cl@example.com", "717171", time.Now().Add(5*time.Minute), "cl1")
	testenv.Eventually(t, 15*time.Second, "the claim to be tried twice", func() bool {
		return proxy.refused.Load() >= before+2 && h.consumer(t).Delivered.Consumer == 1
	})
	proxy.Restore()

	d := decode[events.Delivered](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", 1, 15*time.Second)[0])
	h.waitAcked(t)
	if n := len(h.smtp.Mails()); n != 1 || d.ChallengeID != challenge(42) {
		t.Fatalf("%d mails, delivered %+v", n, d)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 0 {
		t.Fatalf("%d dead letters for a job that was mailed", n)
	}
}

// TestJobHeldUntilItsLastDeliveryEndsExpiredInTheDLQ: another dispatcher's claim holds a
// job (its lease outlives the code: that dispatcher hangs) through every delivery the job
// gets. On the last one, once the code has expired, the job is given up: the row is taken
// over as expired, one otp.dispatch_expired is published and the job goes to OTP_DLQ with
// the consumer, the reason and its original headers. Nothing is mailed.
func TestJobHeldUntilItsLastDeliveryEndsExpiredInTheDLQ(t *testing.T) {
	for _, tc := range []struct {
		name       string
		maxDeliver int
	}{
		{"redelivered until the last delivery", 2},
		{"kept on its only delivery", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarnessConfig(t, Config{MaxDeliver: tc.maxDeliver}, smtpOnly)
			c := challenge(43)
			expires := time.Now().Add(2 * time.Second)
			_, err := h.pool.Exec(context.Background(), `INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id,
				status, attempts, expires_at, claimed_at, lease_until) VALUES ($1, 1, 'acme', 'r', 'sending', 1, $2, now(), now() + interval '1 hour')`, c, expires)
			testenv.Must(t, err, "insert a claim that never ends")
			h.publish(t, c, "held@example.com", "727272", expires, "held1")

			dl := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq.acme", 1, 15*time.Second)
			e := decode[events.DispatchExpired](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.dispatch_expired.acme", 1, 10*time.Second)[0])
			if e.ChallengeID != c || e.CodeSeq != 1 {
				t.Fatalf("dispatch_expired = %+v", e)
			}
			reason := dl[0].Header.Get(events.HeaderDLQReason)
			if !strings.HasPrefix(reason, events.ConsumerDispatcher+": "+events.DeliveryReasonHeldPastExpiry) {
				t.Fatalf("DLQ reason %q", reason)
			}
			if got := dl[0].Header.Get(events.HeaderDLQDelivered); got != strconv.Itoa(tc.maxDeliver) {
				t.Errorf("dead-lettered after %s deliveries, want %d", got, tc.maxDeliver)
			}
			orig := testenv.OpenDeadLetter(t, h.dlq, dl[0])
			if orig.Subject != "otp.dispatch.acme" || !slices.Equal(orig.Header[jetstream.MsgIDHeader], []string{"held1"}) {
				t.Fatalf("dead letter of %s with headers %v", orig.Subject, orig.Header)
			}
			testenv.Eventually(t, 10*time.Second, "the job to leave the work queue", func() bool {
				return len(testenv.Messages(t, h.js, events.StreamDispatch, "")) == 0
			})
			for _, typ := range []events.Type{events.TypeDelivered, events.TypeDeliveryFailed, events.TypeDispatchExpired} {
				want := 0
				if typ == events.TypeDispatchExpired {
					want = 1
				}
				if n := len(testenv.Messages(t, h.js, events.StreamEvents, typ.Subject("acme"))); n != want {
					t.Errorf("%d %s events, want %d", n, typ, want)
				}
			}
			var status string
			testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT status FROM dispatcher.deliveries WHERE challenge_id = $1`, c).Scan(&status), "read the row")
			if status != statusExpired || len(h.smtp.Mails()) != 0 {
				t.Fatalf("row %q, %d mails", status, len(h.smtp.Mails()))
			}
		})
	}
}

// TestAmbiguousAnswerOnTheLastDeliveryIsResentHere: SES takes the mail and drops the
// connection on the job's only delivery. The one deliberate re-send cannot come from the
// broker, so the dispatcher keeps the job and re-sends it itself, with the same code.
func TestAmbiguousAnswerOnTheLastDeliveryIsResentHere(t *testing.T) {
	srv := sestest.New(t)
	srv.SetFault(func(n int64, _ sestest.Email) sestest.Fault {
		if n == 1 {
			return sestest.Fault{AcceptThenReset: true}
		}
		return sestest.Fault{}
	})
	h := sesFirstConfig(t, srv, Config{MaxDeliver: 1})
	h.publish(t, challenge(44), "amb@example.com", "737373", time.Now().Add(5*time.Minute), "amb1")
	d := h.deliveredVia(t, 1)
	h.waitAcked(t)
	mails := srv.Emails()
	if d.Provider != "ses" || d.Unconfirmed || d.Attempts != 2 || len(mails) != 2 {
		t.Fatalf("delivered %+v with %d SES mails, want a confirmed re-send on attempt 2", d, len(mails))
	}
	for _, m := range mails {
		if !strings.Contains(m.Text, "737373") {
			t.Fatalf("the re-send carries another code: %q", m.Text)
		}
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 0 {
		t.Fatalf("%d dead letters for a job that was mailed", n)
	}
}

// TestPublishFailingOnTheLastDeliveryIsRetried: the mail goes out and is recorded, but
// OTP_EVENTS takes no otp.delivered for a while (its subjects were changed under it). On
// the job's last delivery the dispatcher keeps it and publishes the event once the stream
// takes it again; the job is acknowledged and the code was mailed once.
func TestPublishFailingOnTheLastDeliveryIsRetried(t *testing.T) {
	h := newHarnessConfig(t, Config{MaxDeliver: 1}, smtpOnly)
	ctx := context.Background()
	st, err := h.js.Stream(ctx, events.StreamEvents)
	testenv.Must(t, err, "OTP_EVENTS")
	info, err := st.Info(ctx)
	testenv.Must(t, err, "OTP_EVENTS info")
	full := info.Config
	h.smtp.SetAccept(func(testenv.Mail) {
		cfg := full
		cfg.Subjects = slices.DeleteFunc(slices.Clone(full.Subjects), func(s string) bool { return s == events.TypeDelivered.Wildcard() })
		_, err := h.js.UpdateStream(ctx, cfg)
		testenv.Must(t, err, "take otp.delivered off OTP_EVENTS")
	})
	h.publish(t, challenge(45), "pub@example.com", "747474", time.Now().Add(5*time.Minute), "pub1")
	testenv.Eventually(t, 15*time.Second, "two failed publishes", func() bool {
		return strings.Count(h.log.String(), "publish delivery events") >= 2
	})
	_, err = h.js.UpdateStream(ctx, full)
	testenv.Must(t, err, "put otp.delivered back on OTP_EVENTS")

	d := h.deliveredVia(t, 1)
	h.waitAcked(t)
	if n := len(h.smtp.Mails()); n != 1 || d.ChallengeID != challenge(45) {
		t.Fatalf("%d mails, delivered %+v", n, d)
	}
}

// TestJobInHandIsNotClaimedAgain: a job this process sent and is still recording is not
// claimed a second time here, even once its lease lapsed (the database was away longer
// than the lease): a copy of it waits, then reports the recorded outcome.
func TestJobInHandIsNotClaimedAgain(t *testing.T) {
	h := newHarness(t)
	c := challenge(46)
	_, err := h.pool.Exec(context.Background(), `INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id,
		status, attempts, expires_at, claimed_at, lease_until) VALUES ($1, 1, 'acme', 'r', 'sending', 1, now() + interval '5 minutes', now(), now() - interval '1 second')`, c)
	testenv.Must(t, err, "insert a claim whose lease lapsed")
	k := deliveryKey{c, 1}
	if !h.svc.take(k) { // as the claim that inserted the row did; its record is pending
		t.Fatal("key already in hand")
	}
	h.publish(t, c, "hand@example.com", "757575", time.Now().Add(5*time.Minute), "hand-copy")
	testenv.Eventually(t, 10*time.Second, "the copy to be held", func() bool {
		return testutil.ToFloat64(h.svc.jobs.WithLabelValues("held")) >= 1
	})
	// The record lands, and the row is let go, as recordLoop does.
	_, err = h.pool.Exec(context.Background(), `UPDATE dispatcher.deliveries SET status = 'sent', provider = 'smtp', completed_at = now()
		WHERE challenge_id = $1`, c)
	testenv.Must(t, err, "record")
	h.svc.done(k)
	d := h.deliveredVia(t, 1)
	h.waitAcked(t)
	if n := len(h.smtp.Mails()); n != 0 || d.Provider != "smtp" {
		t.Fatalf("a job in hand was claimed again and mailed (%d mails, delivered %+v)", n, d)
	}
}

// TestCompletionNeverOverwritesASettledRow: a completion applies only to a row still
// sending. A worker that completes a row another settled (a job given up on its last
// delivery takes the row over) gets that row back to report, and the row keeps its one
// outcome. Provider text the database would refuse (a NUL, invalid UTF-8) is cleaned, so
// the record of a mail that went out is never refused.
func TestCompletionNeverOverwritesASettledRow(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	settledC, sendingC := challenge(47), challenge(48)
	_, err := h.pool.Exec(ctx, `INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id, status, attempts,
		expires_at, claimed_at, last_error) VALUES
		($1, 1, 'acme', 'r', 'expired', 2, now(), now(), 'held past expiry'),
		($2, 1, 'acme', 'r', 'sending', 1, now() + interval '5 minutes', now(), '')`, settledC, sendingC)
	testenv.Must(t, err, "insert rows")
	settled, err := h.svc.store.complete(ctx, []completion{
		{key: deliveryKey{settledC, 1}, status: statusSent, provider: "smtp", providerMsg: "m1", confirmed: true},
		{key: deliveryKey{sendingC, 1}, status: statusSent, provider: "smtp", providerMsg: "m\x002\xff", confirmed: true, lastError: "a\x00b"},
	})
	testenv.Must(t, err, "complete")
	if len(settled) != 2 || settled[0] == nil || settled[0].status != statusExpired || settled[0].attempts != 2 || settled[1] != nil {
		t.Fatalf("settled = %v", settled)
	}
	rows, err := h.pool.Query(ctx, `SELECT status, provider_message_id FROM dispatcher.deliveries ORDER BY challenge_id`)
	testenv.Must(t, err, "read rows")
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
		var status, msg string
		err := r.Scan(&status, &msg)
		return status + ":" + msg, err
	})
	testenv.Must(t, err, "read rows")
	if want := []string{"expired:", "sent:m2\uFFFD"}; !slices.Equal(got, want) {
		t.Fatalf("rows %q, want %q", got, want)
	}
}

// TestAJobWhoseDispatcherDiedOnItsLastDeliveryReachesItsOutcome: a dispatcher takes a
// job's only delivery, claims it and dies mid-send (its claim is left with a lease, and no
// process of the dispatcher is up). The server gives the job up when a dispatcher next
// pulls; its advisory waits on OTP_ADVISORIES, and the dispatcher runs the job once more
// as its last delivery: it waits out the dead claim's lease, sends (the one re-send a
// crash mid-send costs, with the same code), records it, publishes otp.delivered and
// deletes the job from the work queue. Nothing is dead-lettered, nothing left. Without
// it, the job would stay in OTP_DISPATCH with no outcome.
func TestAJobWhoseDispatcherDiedOnItsLastDeliveryReachesItsOutcome(t *testing.T) {
	ctx := context.Background()
	h := buildHarness(t, Config{MaxDeliver: 1, Lease: 3 * time.Second}, smtpOnly, nil, 2*time.Second)
	c := challenge(61)
	h.publish(t, c, "last@example.com", "616161", time.Now().Add(5*time.Minute), "last1")
	// The dying dispatcher: it takes the delivery, claims the job, and is gone.
	h.takeAndDie(t)
	_, err := h.pool.Exec(ctx, `INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id, status, attempts, expires_at,
		claimed_at, lease_until) VALUES ($1, 1, 'acme', 'r', 'sending', 1, now() + interval '5 minutes', now(), now() + interval '3 seconds')`, c)
	testenv.Must(t, err, "the dead dispatcher's claim")

	testenv.Start(t, h.svc.Run)
	d := decode[events.Delivered](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", 1, 30*time.Second)[0])
	if d.ChallengeID != c || d.CodeSeq != 1 {
		t.Fatalf("delivered %+v", d)
	}
	testenv.Eventually(t, 10*time.Second, "the job to leave the work queue", func() bool {
		return len(testenv.Messages(t, h.js, events.StreamDispatch, "")) == 0
	})
	testenv.WaitDrained(t, h.js, events.StreamAdvisories, events.ConsumerDispatcherExhausted, 1, 10*time.Second)
	if mails := h.smtp.Mails(); len(mails) != 1 || !strings.Contains(string(mails[0].Data), "616161") {
		t.Fatalf("%d mails", len(mails))
	}
	var status string
	var attempts int
	testenv.Must(t, h.pool.QueryRow(ctx, `SELECT status, attempts FROM dispatcher.deliveries WHERE challenge_id = $1`, c).Scan(&status, &attempts), "row")
	if status != statusSent || attempts != 2 {
		t.Errorf("row %s after %d attempts, want sent after the dead one's and this one", status, attempts)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 0 {
		t.Errorf("%d dead letters", n)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.>")); n != 1 {
		t.Errorf("%d events, want the one otp.delivered", n)
	}
}

// TestAHandedOverJobTheDatabaseRefusesGoesToTheDLQ: a job whose dispatcher died on its
// only delivery is handed over again from its advisory, and the database refuses its
// claim (a constraint): the job goes to OTP_DLQ, sealed, naming the dispatcher and the
// refusal, and leaves the work queue; the advisory is acknowledged, not dead-lettered in
// its place.
func TestAHandedOverJobTheDatabaseRefusesGoesToTheDLQ(t *testing.T) {
	ctx := context.Background()
	h := buildHarness(t, Config{MaxDeliver: 1, Lease: 3 * time.Second}, smtpOnly, nil, 2*time.Second)
	c := challenge(62)
	_, err := testenv.Admin(t, h.pool).Exec(ctx, `ALTER TABLE dispatcher.deliveries ADD CONSTRAINT test_refuse CHECK (request_id <> 'r-`+c+`')`)
	testenv.Must(t, err, "a constraint the claim breaks")
	h.publish(t, c, "refused@example.com", "626262", time.Now().Add(5*time.Minute), "refused1")
	h.takeAndDie(t)

	testenv.Start(t, h.svc.Run)
	dl := testenv.WaitMessages(t, h.js, events.StreamDLQ, "", 1, 30*time.Second)
	if dl[0].Subject != "otp.dlq.acme" || dl[0].Header.Get(events.HeaderDLQConsumer) != events.ConsumerDispatcher ||
		dl[0].Header.Get(events.HeaderDLQStream) != events.StreamDispatch || !strings.Contains(dl[0].Header.Get(events.HeaderDLQReason), "test_refuse") {
		t.Fatalf("dead letter %s %v", dl[0].Subject, dl[0].Header)
	}
	testenv.Eventually(t, 10*time.Second, "the job to leave the work queue", func() bool {
		return len(testenv.Messages(t, h.js, events.StreamDispatch, "")) == 0
	})
	testenv.WaitDrained(t, h.js, events.StreamAdvisories, events.ConsumerDispatcherExhausted, 1, 10*time.Second)
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != 1 || len(h.smtp.Mails()) != 0 {
		t.Errorf("%d dead letters, %d mails", n, len(h.smtp.Mails()))
	}
}

// takeAndDie is a dispatcher that takes a job's delivery and dies: never settled.
func (h *harness) takeAndDie(t *testing.T) {
	t.Helper()
	cons, err := h.js.Consumer(t.Context(), events.StreamDispatch, events.ConsumerDispatcher)
	testenv.Must(t, err, "consumer")
	batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	testenv.Must(t, err, "fetch")
	n := 0
	for range batch.Messages() {
		n++
	}
	if n != 1 {
		t.Fatalf("the dying dispatcher took %d jobs", n)
	}
}
