package platform_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// probe is a service that records what the runner gave it and works until cancelled.
type probe struct {
	d       *platform.Deps
	running chan struct{}
}

func (p *probe) Run(ctx context.Context) error {
	close(p.running)
	<-ctx.Done()
	return nil
}

func probeSpec(name string, loadErr error, built chan<- *probe) platform.ServiceSpec {
	migrations := fstest.MapFS{"00001_init.sql": {Data: []byte("-- +goose Up\nCREATE TABLE " + name + ".t (id int);\n")}}
	return platform.NewServiceSpec(name, name, migrations,
		func(getenv platform.Getenv, _ platform.Common) (string, error) {
			return getenv("PROBE_SETTING"), loadErr
		},
		func(setting string, d *platform.Deps, _ *slog.Logger) (platform.Runner, error) {
			if setting != "on" {
				return nil, errors.New("the config did not reach the constructor")
			}
			p := &probe{d: d, running: make(chan struct{})}
			built <- p
			return p, nil
		})
}

// TestRunServicesStartsServesAndDrains: the runner connects each service as its own role
// (OTP_<SERVICE>_DATABASE_URL over OTP_DATABASE_URL), builds each on connections of its
// own, serves one /metrics /healthz /readyz for them all, and returns nil once cancelled
// and drained.
func TestRunServicesStartsServesAndDrains(t *testing.T) {
	ns := testenv.NATS(t)
	built := make(chan *probe, 2)
	a, b := probeSpec("probe_a", nil, built), probeSpec("probe_b", nil, built)
	d := testenv.NewDB(t)
	d.Migrate(t, a, b)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	addr := ln.Addr().String()
	ln.Close()
	env := map[string]string{"OTP_NATS_URL": ns.ClientURL(), "OTP_DATABASE_URL": "postgres://nobody@127.0.0.1:1/x", "OTP_HTTP_ADDR": addr, "PROBE_SETTING": "on",
		"OTP_PROBE_A_DATABASE_URL": d.RoleURL("probe_a"), "OTP_PROBE_B_DATABASE_URL": d.RoleURL("probe_b")}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- platform.RunServices(ctx, func(k string) string { return env[k] }, io.Discard, a, b)
	}()
	pa, pb := <-built, <-built
	<-pa.running
	<-pb.running
	if pa.d == pb.d || pa.d.NC == pb.d.NC || pa.d.Reg != pb.d.Reg {
		t.Error("want connections of its own per service and one registry")
	}
	// Each reads its own table as its own role, and not the other's.
	for _, p := range []*probe{pa, pb} {
		var user string
		testenv.Must(t, p.d.Pool.QueryRow(ctx, "SELECT current_user").Scan(&user), "current user")
		own := strings.TrimPrefix(user, d.Prefix)
		if own != "probe_a" && own != "probe_b" {
			t.Fatalf("a service connected as %s, want its own role", user)
		}
		other := map[string]string{"probe_a": "probe_b", "probe_b": "probe_a"}[own]
		_, err := p.d.Pool.Exec(ctx, "SELECT * FROM "+own+".t")
		testenv.Must(t, err, "%s reads its own table", user)
		if _, err := p.d.Pool.Exec(ctx, "SELECT * FROM "+other+".t"); err == nil {
			t.Errorf("%s read %s's table", user, other)
		}
	}
	testenv.Eventually(t, 10*time.Second, "the ops endpoint", func() bool {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("after a cancel: %v, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("did not drain within 30s")
	}
}

// TestRunServiceRefusesABadSettingBeforeConnecting: a setting the service refuses stops
// the start at once with that error, with no attempt to reach PostgreSQL or NATS.
func TestRunServiceRefusesABadSettingBeforeConnecting(t *testing.T) {
	refused := &platform.ConfigError{Var: "PROBE_SETTING", Msg: "must be on"}
	env := map[string]string{"OTP_NATS_URL": "nats://127.0.0.1:1", "OTP_DATABASE_URL": "postgres://x@127.0.0.1:1/x", "OTP_CONNECT_TIMEOUT": "30s"}
	var logs strings.Builder
	start := time.Now()
	err := platform.RunService(context.Background(), probeSpec("probe", refused, nil), func(k string) string { return env[k] }, &logs)
	if !errors.Is(err, refused) || fmt.Sprint(err) != "PROBE_SETTING: must be on" {
		t.Fatalf("err = %v, want the setting's error alone", err)
	}
	if time.Since(start) > 5*time.Second || logs.Len() > 0 {
		t.Errorf("took %v and logged %q: it tried to connect", time.Since(start), logs.String())
	}
}

// bareJetStream is a JetStream on a server where nothing is provisioned.
func bareJetStream(t *testing.T) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(testenv.NATS(t).ClientURL())
	testenv.Must(t, err, "connect")
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	return js
}

// TestProvisionPlansAndApplies: provisioning is a step of its own, run as a JetStream
// admin. On an empty server it creates every stream and consumer of the contract; run
// again it changes nothing; a stream and a consumer changed by hand are shown as the
// fields that differ, and a plan (the dry run) applies nothing, while provisioning puts
// them back.
func TestProvisionPlansAndApplies(t *testing.T) {
	js := bareJetStream(t)
	ctx := t.Context()
	o := events.StreamOptions{}
	want := len(events.StreamConfigs(o)) + len(events.ConsumerConfigs(o))
	plan, err := platform.Plan(ctx, js, o)
	testenv.Must(t, err, "plan")
	if len(plan) != want || !plan[0].Create || plan[0].String() != "create stream "+events.StreamRequests {
		t.Fatalf("plan on an empty server: %v, want %d creations", plan, want)
	}
	if _, err := js.Stream(ctx, events.StreamRequests); err == nil {
		t.Fatal("the plan created a stream")
	}
	changes, err := platform.Provision(ctx, js, o)
	testenv.Must(t, err, "provision")
	if len(changes) != want {
		t.Fatalf("provisioned %d, want %d", len(changes), want)
	}
	if again, err := platform.Provision(ctx, js, o); err != nil || len(again) != 0 {
		t.Fatalf("provision again: %v, %v", again, err)
	}

	// Changed by hand: the requests stream kept 2 h, the dispatcher consumer 3 deliveries.
	st, err := js.Stream(ctx, events.StreamRequests)
	testenv.Must(t, err, "stream")
	cfg := st.CachedInfo().Config
	cfg.MaxAge = 2 * time.Hour
	_, err = js.UpdateStream(ctx, cfg)
	testenv.Must(t, err, "update stream")
	cc := events.DispatcherConsumer
	cc.MaxDeliver = 3
	_, err = js.UpdateConsumer(ctx, events.StreamDispatch, cc)
	testenv.Must(t, err, "update consumer")
	plan, err = platform.Plan(ctx, js, o)
	testenv.Must(t, err, "plan")
	got := fmt.Sprint(plan)
	if len(plan) != 2 || !strings.Contains(got, "update stream OTP_REQUESTS: max_age 7200000000000 -> 3600000000000") ||
		!strings.Contains(got, "update consumer dispatcher on OTP_DISPATCH: max_deliver 3 -> 12") {
		t.Fatalf("plan after changes by hand: %s", got)
	}
	if info, _ := js.Stream(ctx, events.StreamRequests); info.CachedInfo().Config.MaxAge != 2*time.Hour {
		t.Fatal("the plan applied a change")
	}
	// Drift in fields the contract leaves unset is drift too: a cap on the audit stream, a
	// republish of the codes elsewhere, a filter on the auditor's consumer.
	ev, err := js.Stream(ctx, events.StreamEvents)
	testenv.Must(t, err, "stream")
	evc := ev.CachedInfo().Config
	evc.MaxMsgs, evc.MaxBytes = 3, 1<<20
	_, err = js.UpdateStream(ctx, evc)
	testenv.Must(t, err, "cap OTP_EVENTS")
	ch, err := js.Stream(ctx, events.StreamChallenges)
	testenv.Must(t, err, "stream")
	chc := ch.CachedInfo().Config
	chc.RePublish = &jetstream.RePublish{Source: ">", Destination: "leak.>"}
	_, err = js.UpdateStream(ctx, chc)
	testenv.Must(t, err, "republish OTP_CHALLENGES")
	ac := events.AuditorConsumer
	ac.FilterSubject = "otp.issued.acme"
	_, err = js.UpdateConsumer(ctx, events.StreamEvents, ac)
	testenv.Must(t, err, "filter the auditor")
	plan, err = platform.Plan(ctx, js, o)
	testenv.Must(t, err, "plan")
	got = fmt.Sprint(plan)
	for _, want := range []string{"update stream OTP_EVENTS: max_bytes 1048576 -> 0, max_msgs 3 -> 0",
		`update stream OTP_CHALLENGES: republish {"dest":"leak.\u003e","src":"\u003e"} -> null`,
		`update consumer auditor on OTP_EVENTS: filter_subject "otp.issued.acme" -> null`} {
		if !strings.Contains(got, want) {
			t.Errorf("plan lacks %q:\n%s", want, got)
		}
	}
	// A service refuses to bind to a consumer whose filter is not the contract's.
	if _, err := platform.Bind(ctx, js, events.StreamEvents, events.AuditorConsumer); err == nil ||
		!strings.Contains(err.Error(), `consumer auditor on stream OTP_EVENTS differs from the contract (filter_subject "otp.issued.acme"`) {
		t.Fatalf("bind to a refiltered consumer: %v", err)
	}
	if changes, err := platform.Provision(ctx, js, o); err != nil || len(changes) != 5 {
		t.Fatalf("provision: %v, %v", changes, err)
	}
	if plan, err := platform.Plan(ctx, js, o); err != nil || len(plan) != 0 {
		t.Fatalf("after provisioning: %v, %v", plan, err)
	}
}

// TestBindNamesWhatIsMissing: a service binds only to what provisioning made, and says
// in one line which stream or consumer is missing; it creates neither.
func TestBindNamesWhatIsMissing(t *testing.T) {
	js := bareJetStream(t)
	ctx := t.Context()
	_, err := platform.Bind(ctx, js, events.StreamRequests, events.IssuerConsumer)
	if err == nil || err.Error() != "stream OTP_REQUESTS does not exist: run otpflow provision" {
		t.Fatalf("no stream: %v", err)
	}
	_, err = platform.Provision(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "provision")
	testenv.Must(t, js.DeleteConsumer(ctx, events.StreamRequests, events.ConsumerIssuer), "delete consumer")
	_, err = platform.Bind(ctx, js, events.StreamRequests, events.IssuerConsumer)
	if err == nil || err.Error() != "consumer issuer on stream OTP_REQUESTS does not exist: run otpflow provision" {
		t.Fatalf("no consumer: %v", err)
	}
	if _, err := js.Consumer(ctx, events.StreamRequests, events.ConsumerIssuer); err == nil {
		t.Fatal("Bind created the consumer")
	}
	if _, err := platform.Bind(ctx, js, events.StreamChallenges, events.VerifierConsumer); err != nil {
		t.Fatalf("bind to a provisioned consumer: %v", err)
	}
}
