package platform_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestTenantRequestStreams: JetStream checks a publish's Nats-Msg-Id and Nats-Expected-*
// headers against the whole stream it lands on, whatever the subject. On the one shared
// OTP_REQUESTS a tenant's app (globex) takes the message id another tenant's (acme's)
// next request will carry, so acme's request is dropped as a duplicate, and reads acme's
// last message id from a refused expectation: both attacks are done here and work. With
// tenant request streams (OTP_TENANT_STREAMS) provisioned over the shared stream, the
// same attacks fail, a tenant that floods is refused at its own bound while the other
// still publishes, a tenant without a stream cannot publish, and OTP_REQUESTS, which the
// issuer reads, holds every tenant's requests (the largest one a tenant may publish
// too), each named by its tenant stream's sequence when it has no message id.
func TestTenantRequestStreams(t *testing.T) {
	js := bareJetStream(t)
	ctx := t.Context()
	_, err := platform.Provision(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "provision the shared stream")

	publish := func(tenant, id string, header nats.Header, body []byte) (*jetstream.PubAck, error) {
		m := nats.NewMsg(events.TypeRequested.Subject(tenant))
		m.Header = nats.Header{}
		for k, v := range header {
			m.Header[k] = v
		}
		if id != "" {
			m.Header.Set(jetstream.MsgIDHeader, id)
		}
		m.Data = body
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return js.PublishMsg(pctx, m)
	}
	body := func(id string) []byte {
		return fmt.Appendf(nil, `{"request_id":%q,"recipient":"x@example.com","purpose":"login"}`, id)
	}
	expectLast := func(id string) nats.Header { return nats.Header{jetstream.ExpectedLastMsgIDHeader: []string{id}} }

	// On the shared stream the attacks work: this is what tenant streams are for.
	_, err = publish("globex", "requested:acme:r1", nil, body("g1"))
	testenv.Must(t, err, "globex publishes under acme's next id")
	ack, err := publish("acme", "requested:acme:r1", nil, body("r1"))
	testenv.Must(t, err, "acme publishes")
	if !ack.Duplicate {
		t.Fatal("on the shared stream acme's request was stored: the attack this test guards against no longer works there, so the rest proves nothing")
	}
	if _, err := publish("globex", "", expectLast("guess"), body("g2")); err == nil || !strings.Contains(err.Error(), "requested:acme:r1") {
		t.Fatalf("on the shared stream a refused expectation named %v, not the stream's last id", err)
	}

	// A bound the server has no room for (it sets each stream's MaxBytes aside when it
	// makes it): provisioning fails, and OTP_REQUESTS still takes every tenant's requests.
	if _, err := platform.Provision(ctx, js, events.StreamOptions{Tenants: []string{"acme", "globex"}, TenantRequestsMaxBytes: 1 << 40}); err == nil {
		t.Fatal("tenant streams of 1 TiB each were provisioned on a test server")
	}
	if ack, err := publish("acme", "", nil, body("r0")); err != nil || ack.Stream != events.StreamRequests {
		t.Fatalf("after a failed switch to tenant streams acme's request: %+v, %v", ack, err)
	}

	// What OTP_REQUESTS holds of each tenant before the switch, read below with the rest.
	shared, err := js.Stream(ctx, events.StreamRequests)
	testenv.Must(t, err, "OTP_REQUESTS")
	before, err := shared.Info(ctx, jetstream.WithSubjectFilter(events.TypeRequested.Subject("*")))
	testenv.Must(t, err, "OTP_REQUESTS before the switch")

	isolated := events.StreamOptions{Tenants: []string{"globex", "acme"}, TenantRequestsMaxBytes: 256 << 10}
	plan, err := platform.Plan(ctx, js, isolated)
	testenv.Must(t, err, "plan")
	got := fmt.Sprint(plan)
	for _, want := range []string{"update stream OTP_REQUESTS: ", "create stream OTP_REQUESTS_acme", "create stream OTP_REQUESTS_globex"} {
		if !strings.Contains(got, want) {
			t.Fatalf("plan from the shared stream to tenant streams lacks %q: %s", want, got)
		}
	}
	_, err = platform.Provision(ctx, js, isolated)
	testenv.Must(t, err, "provision tenant streams over the shared stream")
	if plan, err := platform.Plan(ctx, js, isolated); err != nil || len(plan) != 0 {
		t.Fatalf("after provisioning tenant streams the plan is %v, %v: the server holds something else than the contract", plan, err)
	}

	// The same attacks on tenant streams.
	ack, err = publish("globex", "requested:acme:r2", nil, body("g3"))
	testenv.Must(t, err, "globex publishes under acme's next id")
	if ack.Stream != events.TenantRequestsStream("globex") {
		t.Fatalf("globex's request landed on %s", ack.Stream)
	}
	ack, err = publish("acme", "requested:acme:r2", nil, body("r2"))
	testenv.Must(t, err, "acme publishes")
	if ack.Duplicate || ack.Stream != events.TenantRequestsStream("acme") {
		t.Fatalf("acme's request: %+v; globex's message under the same id must not touch it", ack)
	}
	_, err = publish("globex", "globex-own", nil, body("g4"))
	testenv.Must(t, err, "globex publishes")
	_, err = publish("acme", "requested:acme:r3", nil, body("r3"))
	testenv.Must(t, err, "acme publishes")
	_, err = publish("globex", "", expectLast("guess"), body("g5"))
	if err == nil || strings.Contains(err.Error(), "requested:acme") || !strings.Contains(err.Error(), "globex-own") {
		t.Fatalf("a refused expectation answered %v: it must name globex's own last id and nothing of acme's", err)
	}
	// A tenant without a stream of its own has nowhere to publish.
	if _, err := publish("initech", "", nil, body("i1")); err == nil {
		t.Fatal("a tenant without a request stream published")
	}

	// The largest request a tenant may publish is sourced too: OTP_REQUESTS adds a header.
	big := make([]byte, events.RequestsMaxMsgSize)
	for i := range big {
		big[i] = 'a'
	}
	bigAck, err := publish("acme", "", nil, big)
	testenv.Must(t, err, "acme publishes its largest request")
	// And the largest header block: JetStream bounds a header block at 64 KiB, so the
	// tenant stream's bound leaves room for the header sourcing adds.
	pad := strings.Repeat("p", events.RequestsMaxMsgSize-40)
	_, err = publish("acme", "", nats.Header{"X-Pad": []string{pad}}, nil)
	testenv.Must(t, err, "acme publishes its largest header")

	// Globex floods: refused at its own bound; acme still publishes.
	var refused error
	for i := range 64 {
		if _, refused = publish("globex", fmt.Sprintf("flood-%d", i), nil, make([]byte, 16<<10)); refused != nil {
			break
		}
	}
	var apiErr *jetstream.APIError
	if !errors.As(refused, &apiErr) || !strings.Contains(refused.Error(), "maximum bytes exceeded") {
		t.Fatalf("globex's flood ended with %v, not its stream's bound", refused)
	}
	last, err := publish("acme", "requested:acme:r4", nil, body("r4"))
	testenv.Must(t, err, "acme publishes while globex's stream is full")

	// OTP_REQUESTS holds every tenant's requests, as the issuer's consumers (one per
	// tenant) read them.
	var durables []jetstream.Consumer
	for _, cc := range events.IssuerConsumers(isolated.Tenants) {
		cons, err := js.Consumer(ctx, events.StreamRequests, cc.Durable)
		testenv.Must(t, err, "the issuer's consumer %s", cc.Durable)
		durables = append(durables, cons)
	}
	// Each tenant stream is sourced on its own, so acme's last request can be on
	// OTP_REQUESTS before all of globex's are: read until every request of each tenant
	// (those of the shared stream, and all its own stream holds) has been read and its
	// acknowledgement taken, so that no durable has anything left for the provisioning
	// below to find.
	held := map[string]uint64{}
	for _, tenant := range isolated.Tenants {
		st, err := js.Stream(ctx, events.TenantRequestsStream(tenant))
		testenv.Must(t, err, "%s's stream", tenant)
		info, err := st.Info(ctx)
		testenv.Must(t, err, "%s's stream", tenant)
		held[tenant] = before.State.Subjects[events.TypeRequested.Subject(tenant)] + info.State.Msgs
	}
	seen := map[string]int{}
	read := map[string]uint64{}
	var bigIdentity string
	testenv.Eventually(t, 30*time.Second, "every tenant's requests sourced into OTP_REQUESTS and read", func() bool {
		for _, cons := range durables {
			if !fetchRequests(cons, func(m jetstream.Msg) {
				md, _ := m.Metadata()
				_, tenant, _ := events.SplitSubject(m.Subject())
				id := m.Headers().Get(jetstream.MsgIDHeader)
				seen[tenant+" "+id]++
				read[tenant]++
				if len(m.Data()) == len(big) {
					bigIdentity = events.RequestMessageIdentity(m.Headers(), md.Sequence.Stream)
				}
			}) {
				return false
			}
		}
		return maps.Equal(read, held)
	})
	for _, want := range []string{"acme requested:acme:r2", "acme requested:acme:r3", "acme requested:acme:r4", "globex requested:acme:r2", "globex globex-own"} {
		if seen[want] != 1 {
			t.Errorf("OTP_REQUESTS holds %q %d times, want once (all: %v)", want, seen[want], seen)
		}
	}
	if seen["acme requested:acme:r1"] != 0 {
		t.Errorf("the request the shared stream dropped is on OTP_REQUESTS")
	}
	if want := fmt.Sprintf("%s:%d:", events.TenantRequestsStream("acme"), bigAck.Sequence); !strings.HasPrefix(bigIdentity, want) || len(bigIdentity) == len(want) {
		t.Errorf("the id-less request sourced from acme's stream is named %q, want %q and the stream's identity", bigIdentity, want)
	}

	// A tenant taken off the list would leave its stream taking requests nobody reads:
	// the plan is refused, naming it, until the stream is deleted.
	for _, tenants := range [][]string{{"acme"}, nil} {
		_, err := platform.Plan(ctx, js, events.StreamOptions{Tenants: tenants})
		if err == nil || !strings.Contains(err.Error(), "OTP_REQUESTS_globex") {
			t.Errorf("a plan for tenant streams %v: %v, want refused naming OTP_REQUESTS_globex", tenants, err)
		}
	}
	testenv.Must(t, js.DeleteStream(ctx, events.TenantRequestsStream("globex")), "delete globex's stream")
	if _, err := platform.Provision(ctx, js, events.StreamOptions{Tenants: []string{"acme"}}); err != nil {
		t.Fatalf("provision without globex once its stream is gone: %v", err)
	}
	if last.Stream != events.TenantRequestsStream("acme") {
		t.Errorf("acme's request landed on %s", last.Stream)
	}
}

// TestSourceWatchSeesAStuckTenant: a tenant's app that speaks the NATS protocol itself
// publishes a request whose header block is a bare status line "100" (which nats.go
// cannot write). Its stream stores it; OTP_REQUESTS takes it for flow control, and the
// server retries it for as long as it lives, so every later request of that tenant waits,
// acknowledged and unread, while the other tenant's go through. The source's own lag and
// error say nothing; SourceWatch sees the tenant's oldest waiting request age. Deleting
// that one message, as the runbook says, lets the rest through.
func TestSourceWatchSeesAStuckTenant(t *testing.T) {
	url, js := plainJetStream(t)
	ctx := t.Context()
	_, err := platform.Provision(ctx, js, events.StreamOptions{Tenants: []string{"acme", "globex"}, TenantRequestsMaxBytes: 1 << 20})
	testenv.Must(t, err, "provision tenant streams")
	watch := &platform.SourceWatch{JS: js}
	request := func(tenant, id string) {
		t.Helper()
		_, err := js.Publish(ctx, events.TypeRequested.Subject(tenant), fmt.Appendf(nil, `{"request_id":%q,"recipient":"x@example.com","purpose":"login"}`, id))
		testenv.Must(t, err, "publish %s", id)
	}
	request("acme", "a1")
	request("globex", "g1")
	testenv.Eventually(t, 10*time.Second, "both tenants sourced", func() bool {
		ages, err := watch.Check(ctx)
		return err == nil && len(ages) == 2 && ages["acme"] == 0 && ages["globex"] == 0
	})

	rawStatusLine(t, url, "otp.requested.acme")
	own, err := js.Stream(ctx, events.TenantRequestsStream("acme"))
	testenv.Must(t, err, "acme's stream")
	testenv.Eventually(t, 10*time.Second, "the raw message stored on acme's stream", func() bool {
		info, err := own.Info(ctx)
		return err == nil && info.State.LastSeq == 2
	})
	request("acme", "a2")
	request("globex", "g2")
	testenv.Eventually(t, 20*time.Second, "acme's requests seen waiting while globex's go through", func() bool {
		ages, err := watch.Check(ctx)
		return err == nil && ages["acme"] >= 2*time.Second && ages["globex"] == 0
	})
	requests, err := js.Stream(ctx, events.StreamRequests)
	testenv.Must(t, err, "OTP_REQUESTS")
	if _, err := requests.GetLastMsgForSubject(ctx, "otp.requested.globex"); err != nil {
		t.Fatalf("globex's request: %v", err)
	}
	if m, err := requests.GetLastMsgForSubject(ctx, "otp.requested.acme"); err != nil || !strings.Contains(string(m.Data), `"a1"`) {
		t.Fatalf("acme's last request on OTP_REQUESTS should still be a1 (a2 waits): %v", err)
	}

	// An erasure waits for what the tenant's stream held to be on OTP_REQUESTS: here it
	// cannot, and says which message is missing.
	wctx, cancel := context.WithTimeout(ctx, time.Second)
	err = platform.AwaitSourced(wctx, js, "acme", 3)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "sequence 2 of OTP_REQUESTS_acme") {
		t.Fatalf("waiting for acme's requests behind the stuck one: %v", err)
	}

	// The runbook's fix: delete the stuck message; a2 goes through.
	testenv.Must(t, own.DeleteMsg(ctx, 2), "delete the stuck message")
	wctx, cancel = context.WithTimeout(ctx, 30*time.Second)
	testenv.Must(t, platform.AwaitSourced(wctx, js, "acme", 3), "acme's requests on OTP_REQUESTS once the stuck one is gone")
	cancel()
	testenv.Eventually(t, 30*time.Second, "acme's waiting request sourced once the stuck one is gone", func() bool {
		m, err := requests.GetLastMsgForSubject(ctx, "otp.requested.acme")
		ages, cerr := watch.Check(ctx)
		return err == nil && strings.Contains(string(m.Data), `"a2"`) && cerr == nil && ages["acme"] == 0
	})
}

// rawStatusLine publishes on subject, over the NATS protocol itself, a message whose
// header block is a bare status line "100" (HPUB; nats.go cannot write it): the server
// stores it as it came.
func rawStatusLine(t *testing.T, url, subject string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "nats://"))
	testenv.Must(t, err, "dial")
	t.Cleanup(func() { conn.Close() })
	r := bufio.NewReader(conn)
	_, err = r.ReadString('\n') // INFO
	testenv.Must(t, err, "read INFO")
	hdr := "NATS/1.0 100 FlowControl Request\n\n"
	_, err = fmt.Fprintf(conn, "CONNECT {\"verbose\":false,\"headers\":true,\"protocol\":1}\r\nHPUB %s %d %d\r\n%s\r\nPING\r\n", subject, len(hdr), len(hdr), hdr)
	testenv.Must(t, err, "raw publish")
	line, err := r.ReadString('\n') // PONG: the server has read the publish
	if err != nil || !strings.HasPrefix(line, "PONG") {
		t.Fatalf("raw publish: %q, %v", line, err)
	}
}

// TestSourceWatchAfterAPurgeAndARecreatedStream: the watch and an erasure's wait read
// where sourcing got to from the tenant's last copy on OTP_REQUESTS. With no copy left
// (OTP_REQUESTS purged) they take the server's word that nothing is left to source, not
// a stuck tenant; and a copy from a tenant stream that was deleted and made again (its
// sequences start over) counts for nothing, so the new stream stuck at its first message
// is seen.
func TestSourceWatchAfterAPurgeAndARecreatedStream(t *testing.T) {
	url, js := plainJetStream(t)
	ctx := t.Context()
	o := events.StreamOptions{Tenants: []string{"acme"}, TenantRequestsMaxBytes: 1 << 20}
	_, err := platform.Provision(ctx, js, o)
	testenv.Must(t, err, "provision")
	for i := range 5 {
		_, err := js.Publish(ctx, "otp.requested.acme", fmt.Appendf(nil, `{"request_id":"old%d","recipient":"x@example.com","purpose":"login"}`, i))
		testenv.Must(t, err, "publish")
	}
	requests, err := js.Stream(ctx, events.StreamRequests)
	testenv.Must(t, err, "OTP_REQUESTS")
	testenv.Eventually(t, 10*time.Second, "the five sourced", func() bool {
		m, err := requests.GetLastMsgForSubject(ctx, "otp.requested.acme")
		return err == nil && strings.Contains(string(m.Data), "old4")
	})
	watch := &platform.SourceWatch{JS: js}

	testenv.Must(t, requests.Purge(ctx), "purge OTP_REQUESTS")
	if ages, err := watch.Check(ctx); err != nil || ages["acme"] != 0 {
		t.Fatalf("after a purge of OTP_REQUESTS: %v, %v; want nothing waiting", ages, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	testenv.Must(t, platform.AwaitSourced(wctx, js, "acme", 5), "wait for what acme's stream held after a purge")
	cancel()

	testenv.Must(t, js.DeleteStream(ctx, events.TenantRequestsStream("acme")), "delete acme's stream")
	_, err = platform.Provision(ctx, js, o)
	testenv.Must(t, err, "provision it again")
	rawStatusLine(t, url, "otp.requested.acme")
	_, err = js.Publish(ctx, "otp.requested.acme", []byte(`{"request_id":"new1","recipient":"x@example.com","purpose":"login"}`))
	testenv.Must(t, err, "publish")
	testenv.Eventually(t, 20*time.Second, "the new stream seen stuck at its first message", func() bool {
		ages, err := watch.Check(ctx)
		return err == nil && ages["acme"] >= time.Second
	})
	wctx, cancel = context.WithTimeout(ctx, time.Second)
	err = platform.AwaitSourced(wctx, js, "acme", 2)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "sequence 1 of OTP_REQUESTS_acme") {
		t.Fatalf("waiting for the new stream's requests: %v", err)
	}
}

// plainJetStream is a NATS server of the test's own, with nothing provisioned, and a
// client of it.
func plainJetStream(t *testing.T) (string, jetstream.JetStream) {
	t.Helper()
	s := testenv.NATS(t)
	nc, err := nats.Connect(s.ClientURL())
	testenv.Must(t, err, "connect")
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	return s.ClientURL(), js
}

// fetchRequests hands f what cons has to give now, acknowledging each and waiting for
// the server to take the acknowledgement; false when the fetch or an acknowledgement
// failed.
func fetchRequests(cons jetstream.Consumer, f func(jetstream.Msg)) bool {
	batch, err := cons.FetchNoWait(500)
	if err != nil {
		return false
	}
	for m := range batch.Messages() {
		f(m)
		if m.DoubleAck(context.Background()) != nil {
			return false
		}
	}
	return batch.Error() == nil
}
