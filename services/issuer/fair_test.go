package issuer

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

// TestAFloodingTenantDoesNotDelayAnother: acme has a backlog of 4,000 requests on
// OTP_REQUESTS when globex asks for one code. With tenant request streams the issuer
// reads a durable per tenant, so globex's request is issued while most of acme's backlog
// is still unread: read first in, first out, it would wait for all of it. A tenant added
// while the issuer runs is read without a restart.
func TestAFloodingTenantDoesNotDelayAnother(t *testing.T) {
	ctx := t.Context()
	nc, js := testenv.JetStream(t, testenv.NATS(t))
	o := events.StreamOptions{Tenants: []string{"acme", "globex"}}
	_, err := platform.Provision(ctx, js, o)
	testenv.Must(t, err, "provision tenant streams")

	const backlog = 4000
	var last jetstream.PubAckFuture
	for i := range backlog {
		body := fmt.Sprintf(`{"request_id":"flood-%d","recipient":"u%d@acme.example","purpose":"login"}`, i, i)
		if last, err = js.PublishAsync("otp.requested.acme", []byte(body)); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		t.Fatal("acme's backlog was not stored")
	}
	select {
	case <-last.Ok():
	case err := <-last.Err():
		t.Fatalf("acme's last request: %v", err)
	}
	_, err = js.Publish(ctx, "otp.requested.globex", []byte(`{"request_id":"g1","recipient":"g@globex.example","purpose":"login"}`))
	testenv.Must(t, err, "globex's request")
	testenv.Eventually(t, 10*time.Second, "acme's backlog sourced into OTP_REQUESTS", func() bool {
		st, err := js.Stream(ctx, events.StreamRequests)
		return err == nil && st.CachedInfo().State.Msgs == backlog+1
	})

	issued, err := nc.SubscribeSync("otp.issued.>")
	testenv.Must(t, err, "subscribe otp.issued")
	testenv.Start(t, newIssuer(t, js, nil, Config{ConsumersCheckEvery: 200 * time.Millisecond}).Run)

	acmeIssued := 0
	for {
		m, err := issued.NextMsg(20 * time.Second)
		testenv.Must(t, err, "globex's code issued")
		if m.Subject == "otp.issued.acme" {
			acmeIssued++
			continue
		}
		break
	}
	if acmeIssued > backlog/4 {
		t.Fatalf("globex's code came after %d of acme's %d: globex waited behind acme's backlog", acmeIssued, backlog)
	}
	t.Logf("globex's code issued after %d of acme's %d", acmeIssued, backlog)

	// A tenant provisioned while the issuer runs is read by it.
	o.Tenants = append(o.Tenants, "initech")
	_, err = platform.Provision(ctx, js, o)
	testenv.Must(t, err, "provision initech")
	_, err = js.Publish(ctx, "otp.requested.initech", []byte(`{"request_id":"i1","recipient":"i@initech.example","purpose":"login"}`))
	testenv.Must(t, err, "initech's request")
	deadline := time.Now().Add(30 * time.Second)
	for {
		m, err := issued.NextMsg(time.Until(deadline))
		testenv.Must(t, err, "initech's code issued")
		if m.Subject == "otp.issued.acme" {
			acmeIssued++
		}
		if m.Subject == "otp.issued.initech" {
			break
		}
	}
	// And every one of acme's requests got its code.
	for acmeIssued < backlog {
		m, err := issued.NextMsg(time.Until(deadline.Add(30 * time.Second)))
		testenv.Must(t, err, "acme's codes (%d of %d issued)", acmeIssued, backlog)
		if m.Subject == "otp.issued.acme" {
			acmeIssued++
		}
	}
}

// TestTheIssuerFollowsProvisioning: a running issuer, under steady requests, while
// provisioning turns tenant streams on over the shared stream, takes a tenant off and
// adds it back. It reads the durables that take over and lets go of the ones deleted
// without stopping; every request gets exactly one code (none lost, none issued twice,
// none refused), and its metrics can be collected throughout, with no series left for a
// durable that is gone.
func TestTheIssuerFollowsProvisioning(t *testing.T) {
	ctx := t.Context()
	nc, js := testenv.JetStream(t, testenv.NATS(t))
	reg := prometheus.NewRegistry()
	svc := newIssuer(t, js, reg, Config{ConsumersCheckEvery: 100 * time.Millisecond, LagCheckEvery: 100 * time.Millisecond})
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(runCtx) }()
	t.Cleanup(func() { stop(); <-done })
	running := func(when string) {
		t.Helper()
		select {
		case err := <-done:
			t.Fatalf("%s: the issuer stopped: %v", when, err)
		default:
		}
	}

	outcomes, err := nc.SubscribeSync("otp.*.*")
	testenv.Must(t, err, "subscribe")
	issued := map[string]int{}
	var refused []string
	// await reads events until every request in ids has its code.
	await := func(ids []string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for _, id := range ids {
			for issued[id] == 0 {
				m, err := outcomes.NextMsg(time.Until(deadline))
				testenv.Must(t, err, "the code of %s (issued %d, refused %v)", id, len(issued), refused)
				switch {
				case strings.HasPrefix(m.Subject, "otp.issued."):
					issued[decodeField(t, m.Data, "request_id")]++
				case strings.HasPrefix(m.Subject, "otp.rejected."):
					refused = append(refused, string(m.Data))
				}
			}
		}
	}
	// publish sends 20 requests of each tenant as an app does: a publish not
	// acknowledged (no stream takes the subject while provisioning moves it) is sent again
	// under the same message id.
	var n atomic.Int64
	publish := func(tenants ...string) ([]string, error) {
		var ids []string
		for range 20 {
			for _, tenant := range tenants {
				i := n.Add(1)
				id := fmt.Sprintf("%s-%d", tenant, i)
				body := fmt.Sprintf(`{"request_id":%q,"recipient":"u%d@%s.example","purpose":"login"}`, id, i, tenant)
				var err error
				for try := 0; try == 0 || err != nil && try < 100; try++ {
					pctx, cancel := context.WithTimeout(ctx, time.Second)
					_, err = js.Publish(pctx, "otp.requested."+tenant, []byte(body), jetstream.WithMsgID(id))
					cancel()
					if err != nil {
						time.Sleep(50 * time.Millisecond) // an app's pause before it asks again
					}
				}
				if err != nil {
					return nil, fmt.Errorf("publish %s: %w", id, err)
				}
				ids = append(ids, id)
			}
		}
		return ids, nil
	}
	burst := func(tenants ...string) []string {
		t.Helper()
		ids, err := publish(tenants...)
		testenv.Must(t, err, "requests of %v", tenants)
		return ids
	}
	// series lists the durables the backlog gauge has a series of; gathering fails if a
	// metric cannot be collected.
	series := func() []string {
		t.Helper()
		families, err := reg.Gather()
		testenv.Must(t, err, "gather the issuer's metrics")
		var out []string
		for _, f := range families {
			if f.GetName() != "otpflow_consumer_oldest_unsettled_age_seconds" {
				continue
			}
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "consumer" {
						out = append(out, l.GetValue())
					}
				}
			}
		}
		slices.Sort(out)
		return out
	}
	waitSeries := func(want ...string) {
		t.Helper()
		testenv.Eventually(t, 10*time.Second, "backlog series of "+strings.Join(want, ", "), func() bool {
			return slices.Equal(series(), want)
		})
	}

	await(burst("acme", "globex"))
	waitSeries("issuer")

	// Tenant streams on, with requests published while provisioning runs.
	type published struct {
		ids []string
		err error
	}
	sent := make(chan published)
	go func() {
		var p published
		for range 5 {
			var ids []string
			ids, p.err = publish("acme", "globex")
			if p.ids = append(p.ids, ids...); p.err != nil {
				break
			}
		}
		sent <- p
	}()
	tenants := events.StreamOptions{Tenants: []string{"acme", "globex"}}
	_, err = platform.Provision(ctx, js, tenants)
	testenv.Must(t, err, "provision tenant streams")
	p := <-sent
	testenv.Must(t, p.err, "requests while provisioning ran")
	await(append(p.ids, burst("acme", "globex")...))
	waitSeries("issuer_acme", "issuer_globex")
	running("after turning tenant streams on")

	// globex taken off: its stream deleted once sourced, then provisioning retires its
	// durable; then added back.
	testenv.Eventually(t, 10*time.Second, "globex's requests all on OTP_REQUESTS", func() bool {
		ages, err := (&platform.SourceWatch{JS: js}).Check(ctx)
		return err == nil && ages["globex"] == 0
	})
	testenv.Must(t, js.DeleteStream(ctx, events.TenantRequestsStream("globex")), "delete globex's stream")
	_, err = platform.Provision(ctx, js, events.StreamOptions{Tenants: []string{"acme"}})
	testenv.Must(t, err, "provision without globex")
	await(burst("acme"))
	waitSeries("issuer_acme")
	running("after taking globex off")
	_, err = platform.Provision(ctx, js, tenants)
	testenv.Must(t, err, "provision globex again")
	testenv.Eventually(t, 10*time.Second, "globex's stream takes requests again", func() bool {
		_, err := js.Publish(ctx, "otp.requested.globex", []byte(`{"request_id":"probe","recipient":"probe@globex.example","purpose":"login"}`))
		return err == nil
	})
	await(append(burst("acme", "globex"), "probe"))
	waitSeries("issuer_acme", "issuer_globex")
	running("after adding globex back")

	for id, k := range issued {
		if k != 1 {
			t.Errorf("%s was issued %d times", id, k)
		}
	}
	if len(refused) > 0 {
		t.Errorf("requests refused: %v", refused)
	}
}

// decodeField reads one string field of a JSON event body.
func decodeField(t *testing.T, data []byte, field string) string {
	t.Helper()
	var v map[string]any
	testenv.Must(t, json.Unmarshal(data, &v), "decode %s", data)
	s, _ := v[field].(string)
	return s
}

// newIssuer is an issuer with new keys and a database of its own, cfg's timings, and its
// metrics in reg (optional).
func newIssuer(t *testing.T, js jetstream.JetStream, reg *prometheus.Registry, cfg Config) *Service {
	t.Helper()
	var err error
	cfg.Pepper, err = keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	cfg.Sealer, err = keys.ParseSealer(keys.Generate("s1", 32))
	testenv.Must(t, err, "sealer")
	cfg.Subjects, err = keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subjects")
	cfg.DLQKey = testenv.DLQKey(t)
	var r prometheus.Registerer
	if reg != nil {
		r = reg
	}
	svc, err := New(cfg, testenv.Postgres(t, Spec()), js, testenv.Logger(io.Discard), r)
	testenv.Must(t, err, "new issuer")
	return svc
}

// TestTheIssuerStartsWhileProvisioningIsHalfDone: provisioning has switched the streams
// to tenant streams and made none of the tenants' durables yet (it stopped there, or is
// still running) when an issuer starts. The issuer reads the shared durable, which still
// holds and receives every request, so no tenant is shown unread; once provisioning
// finishes it reads the tenants' durables. A tenant's durable deleted by hand is shown
// missing (its requests go unread) until provisioning makes it again.
func TestTheIssuerStartsWhileProvisioningIsHalfDone(t *testing.T) {
	ctx := t.Context()
	nc, js := testenv.JetStream(t, testenv.NATS(t))
	tenants := events.StreamOptions{Tenants: []string{"acme", "globex"}}
	// The streams step of provisioning alone: OTP_REQUESTS lets go of the subjects and
	// sources the tenant streams, which take them.
	for _, cfg := range events.StreamConfigs(tenants) {
		if events.IsRequestsStream(cfg.Name) {
			_, err := js.CreateOrUpdateStream(ctx, cfg)
			testenv.Must(t, err, "stream %s", cfg.Name)
		}
	}
	issued, err := nc.SubscribeSync("otp.issued.>")
	testenv.Must(t, err, "subscribe")
	reg := prometheus.NewRegistry()
	testenv.Start(t, newIssuer(t, js, reg, Config{ConsumersCheckEvery: 100 * time.Millisecond}).Run)
	missing := func() map[string]float64 {
		t.Helper()
		families, err := reg.Gather()
		testenv.Must(t, err, "gather")
		out := map[string]float64{}
		for _, f := range families {
			if f.GetName() == "otpflow_issuer_consumer_missing" {
				for _, m := range f.GetMetric() {
					// Its durable on OTP_ADVISORIES is another matter (poison_test.go).
					if l := m.GetLabel()[0].GetValue(); l != events.ConsumerIssuerExhausted {
						out[l] = m.GetGauge().GetValue()
					}
				}
			}
		}
		return out
	}
	request := func(tenant, id string) {
		t.Helper()
		_, err := js.Publish(ctx, "otp.requested."+tenant, []byte(fmt.Sprintf(`{"request_id":%q,"recipient":"%s@%s.example","purpose":"login"}`, id, id, tenant)))
		testenv.Must(t, err, "publish %s", id)
		m, err := issued.NextMsg(20 * time.Second)
		testenv.Must(t, err, "the code of %s", id)
		if got := decodeField(t, m.Data, "request_id"); got != id {
			t.Fatalf("issued %s, want %s", got, id)
		}
	}
	request("acme", "a1")
	request("globex", "g1")
	if got := missing(); got["issuer_acme"] != 0 || got["issuer_globex"] != 0 || len(got) != 2 {
		t.Fatalf("missing durables shown while the shared durable reads every request: %v", got)
	}

	_, err = platform.Provision(ctx, js, tenants)
	testenv.Must(t, err, "provisioning finishes")
	testenv.Eventually(t, 10*time.Second, "no durable missing", func() bool {
		got := missing()
		return got["issuer_acme"] == 0 && got["issuer_globex"] == 0
	})
	request("acme", "a2")
	request("globex", "g2")

	testenv.Must(t, js.DeleteConsumer(ctx, events.StreamRequests, "issuer_globex"), "delete globex's durable")
	testenv.Eventually(t, 10*time.Second, "globex's durable shown missing", func() bool {
		return missing()["issuer_globex"] == 1 && missing()["issuer_acme"] == 0
	})
	_, err = platform.Provision(ctx, js, tenants)
	testenv.Must(t, err, "provision again")
	testenv.Eventually(t, 10*time.Second, "globex's durable read again", func() bool { return missing()["issuer_globex"] == 0 })
	request("globex", "g3")
}
