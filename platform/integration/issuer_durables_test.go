package platform_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestIssuerDurablesTakeOver: turning tenant request streams on gives the issuer a
// durable per tenant on OTP_REQUESTS. Provisioning creates each where the shared durable
// left off, so the requests it had answered are not read again (each would now be
// stale) and the ones it had not are read by their tenant's durable, then retires the
// shared durable; the services bind to what it made and a second plan finds nothing to
// change. A durable whose tenant was taken off while it still had requests to read is
// not retired until it has read them; then it is.
func TestIssuerDurablesTakeOver(t *testing.T) {
	js := bareJetStream(t)
	ctx := t.Context()
	_, err := platform.Provision(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "provision the shared stream")
	publish := func(tenant, id string) uint64 {
		t.Helper()
		ack, err := js.Publish(ctx, "otp.requested."+tenant, []byte(`{}`), jetstream.WithMsgID(id))
		testenv.Must(t, err, "publish %s", id)
		return ack.Sequence
	}
	// read fetches n messages from durable, then whatever else it has at once,
	// acknowledging them, and returns their message ids.
	read := func(durable string, n int) []string {
		t.Helper()
		cons, err := js.Consumer(ctx, events.StreamRequests, durable)
		testenv.Must(t, err, "consumer %s", durable)
		var ids []string
		take := func(batch jetstream.MessageBatch, err error) {
			t.Helper()
			testenv.Must(t, err, "fetch from %s", durable)
			for m := range batch.Messages() {
				ids = append(ids, m.Headers().Get(jetstream.MsgIDHeader))
				testenv.Must(t, m.DoubleAck(ctx), "ack")
			}
		}
		take(cons.Fetch(n, jetstream.FetchMaxWait(5*time.Second)))
		take(cons.FetchNoWait(10))
		return ids
	}
	for i := range 3 {
		publish("acme", fmt.Sprintf("a%d", i))
		publish("globex", fmt.Sprintf("g%d", i))
	}
	// The issuer answered a0 g0 a1; g1 a2 g2 are unread.
	cons, err := js.Consumer(ctx, events.StreamRequests, events.ConsumerIssuer)
	testenv.Must(t, err, "the shared durable")
	batch, err := cons.Fetch(3, jetstream.FetchMaxWait(5*time.Second))
	testenv.Must(t, err, "fetch from the shared durable")
	var got []string
	for m := range batch.Messages() {
		got = append(got, m.Headers().Get(jetstream.MsgIDHeader))
		testenv.Must(t, m.DoubleAck(ctx), "ack")
	}
	if !slices.Equal(got, []string{"a0", "g0", "a1"}) {
		t.Fatalf("the shared durable read %v", got)
	}

	tenants := events.StreamOptions{Tenants: []string{"acme", "globex"}}
	plan, err := platform.Plan(ctx, js, tenants)
	testenv.Must(t, err, "plan")
	var lines []string
	for _, c := range plan {
		if c.Consumer != "" {
			lines = append(lines, c.String())
		}
	}
	want := []string{
		"create consumer issuer_acme on OTP_REQUESTS from sequence 4, its subjects' first request not yet read",
		"create consumer issuer_globex on OTP_REQUESTS from sequence 4, its subjects' first request not yet read",
		"delete consumer issuer on OTP_REQUESTS (read by issuer_acme, issuer_globex instead)",
	}
	if !slices.Equal(lines, want) {
		t.Fatalf("the plan's consumers:\n%s\nwant\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
	// Provisioning stops halfway: a consumer named issuer_globex, made by hand without
	// acknowledgements, cannot be changed to the contract's. The streams have changed,
	// issuer_acme is made, and the shared durable is still there.
	bad := events.IssuerTenantConsumer("globex")
	bad.AckPolicy = jetstream.AckNonePolicy
	_, err = js.CreateConsumer(ctx, events.StreamRequests, bad)
	testenv.Must(t, err, "a consumer made by hand")
	if _, err = platform.Provision(ctx, js, tenants); err == nil || !strings.Contains(err.Error(), "issuer_globex") {
		t.Fatalf("provisioning over the hand-made consumer: %v", err)
	}
	for _, name := range []string{events.ConsumerIssuer, "issuer_acme"} {
		_, err := js.Consumer(ctx, events.StreamRequests, name)
		testenv.Must(t, err, "%s after the halfway provisioning", name)
	}
	publish("acme", "a3")
	publish("globex", "g3")
	sourced := func(n uint64) {
		t.Helper()
		testenv.Eventually(t, 10*time.Second, "OTP_REQUESTS holds %d", func() bool {
			st, err := js.Stream(ctx, events.StreamRequests)
			return err == nil && st.CachedInfo().State.Msgs == n
		})
	}
	sourced(8)
	if got := read("issuer_acme", 2); !slices.Equal(got, []string{"a2", "a3"}) {
		t.Fatalf("issuer_acme read %v, want what the shared durable had not: a2 a3", got)
	}
	// Run again once the hand-made consumer is gone, it finishes: issuer_acme, ahead of
	// the shared durable now, started no later than it and reads the rest of acme's.
	testenv.Must(t, js.DeleteConsumer(ctx, events.StreamRequests, "issuer_globex"), "delete the hand-made consumer")
	_, err = platform.Provision(ctx, js, tenants)
	testenv.Must(t, err, "provision tenant streams again")
	if _, err := js.Consumer(ctx, events.StreamRequests, events.ConsumerIssuer); err == nil {
		t.Fatal("the shared durable is still there")
	}
	for _, cc := range events.IssuerConsumers(tenants.Tenants) {
		_, err := platform.Bind(ctx, js, events.StreamRequests, cc)
		testenv.Must(t, err, "the issuer binds %s", cc.Durable)
	}
	plan, err = platform.Plan(ctx, js, tenants)
	if err != nil || len(plan) != 0 {
		t.Fatalf("a second plan: %v, %v", plan, err)
	}
	if got := read("issuer_globex", 3); !slices.Equal(got, []string{"g1", "g2", "g3"}) {
		t.Fatalf("issuer_globex read %v, want g1 g2 g3", got)
	}

	// A durable made at a sequence is changed like any other: provisioning puts back a
	// limit changed by hand, keeping where it starts (the server refuses to move that).
	acmeCons, err := js.Consumer(ctx, events.StreamRequests, "issuer_acme")
	testenv.Must(t, err, "issuer_acme")
	tuned := acmeCons.CachedInfo().Config
	tuned.MaxDeliver = 3
	_, err = js.UpdateConsumer(ctx, events.StreamRequests, tuned)
	testenv.Must(t, err, "change issuer_acme by hand")
	plan, err = platform.Plan(ctx, js, tenants)
	if err != nil || len(plan) != 1 || !strings.HasPrefix(plan[0].String(), "update consumer issuer_acme on OTP_REQUESTS: max_deliver 3 -> 10") {
		t.Fatalf("the plan after a change by hand: %v, %v", plan, err)
	}
	_, err = platform.Provision(ctx, js, tenants)
	testenv.Must(t, err, "put issuer_acme back")
	if plan, err = platform.Plan(ctx, js, tenants); err != nil || len(plan) != 0 {
		t.Fatalf("the plan once put back: %v, %v", plan, err)
	}

	// globex is taken off (its stream deleted, as the runbook says) while its durable has
	// a request to read: nothing else would read it.
	publish("globex", "g4")
	sourced(9)
	testenv.Must(t, js.DeleteStream(ctx, events.TenantRequestsStream("globex")), "delete globex's stream")
	acme := events.StreamOptions{Tenants: []string{"acme"}}
	_, err = platform.Provision(ctx, js, acme)
	if err == nil || !strings.Contains(err.Error(), "consumer issuer_globex on OTP_REQUESTS has requests of otp.requested.globex still to read") {
		t.Fatalf("retiring globex's durable with g4 unread: %v", err)
	}
	if got := read("issuer_globex", 1); !slices.Equal(got, []string{"g4"}) {
		t.Fatalf("issuer_globex read %v", got)
	}
	changes, err := platform.Provision(ctx, js, acme)
	testenv.Must(t, err, "provision once globex's durable has read everything")
	if !slices.ContainsFunc(changes, func(c platform.Change) bool { return c.Delete && c.Consumer == "issuer_globex" }) {
		t.Fatalf("globex's durable not retired: %v", changes)
	}
	if _, err := js.Consumer(ctx, events.StreamRequests, "issuer_globex"); err == nil {
		t.Fatal("globex's durable is still there")
	}

	// Tenant streams turned off again. acme's durable has nothing left to read; globex's
	// requests were read by a durable that is gone, so no durable can say how far they
	// were answered: the shared durable starts at globex's first request still stored, and
	// reads again what was answered since (the issuer recognises it) rather than skip
	// anything. OTP_REQUESTS captures every tenant's requests itself once more.
	testenv.Must(t, js.DeleteStream(ctx, events.TenantRequestsStream("acme")), "delete acme's stream")
	plan, err = platform.Plan(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "plan the shared stream again")
	if !slices.ContainsFunc(plan, func(c platform.Change) bool {
		return c.String() == "create consumer issuer on OTP_REQUESTS from sequence 2, its subjects' first request not yet read"
	}) {
		t.Fatalf("the plan back to the shared durable: %v", plan)
	}
	_, err = platform.Provision(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "provision the shared stream again")
	publish("acme", "a5")
	// (a3 and g3 were sourced from two streams, in either order.)
	got = read(events.ConsumerIssuer, 9)
	if slices.Sort(got); !slices.Equal(got, []string{"a1", "a2", "a3", "a5", "g0", "g1", "g2", "g3", "g4"}) {
		t.Fatalf("the shared durable, back, read %v", got)
	}
}

// TestANewTenantsRequestsAreReadAfterAHalfwayProvisioning: a tenant is added, and
// provisioning stops after its stream is sourced, before its durable is made (a consumer
// made by hand under that name cannot be changed). Its app publishes meanwhile, and its
// requests land on OTP_REQUESTS. Run again, provisioning makes the durable from the
// tenant's first request: none is skipped.
func TestANewTenantsRequestsAreReadAfterAHalfwayProvisioning(t *testing.T) {
	js := bareJetStream(t)
	ctx := t.Context()
	_, err := platform.Provision(ctx, js, events.StreamOptions{Tenants: []string{"acme"}})
	testenv.Must(t, err, "provision acme")
	for i := range 3 {
		_, err := js.Publish(ctx, "otp.requested.acme", []byte(`{}`), jetstream.WithMsgID(fmt.Sprintf("a%d", i)))
		testenv.Must(t, err, "publish")
	}
	bad := events.IssuerTenantConsumer("globex")
	bad.AckPolicy = jetstream.AckNonePolicy
	_, err = js.CreateConsumer(ctx, events.StreamRequests, bad)
	testenv.Must(t, err, "a consumer made by hand")
	both := events.StreamOptions{Tenants: []string{"acme", "globex"}}
	if _, err := platform.Provision(ctx, js, both); err == nil {
		t.Fatal("provisioning over the hand-made consumer went through")
	}
	var ids []string
	for i := range 3 {
		id := fmt.Sprintf("g%d", i)
		_, err := js.Publish(ctx, "otp.requested.globex", []byte(`{}`), jetstream.WithMsgID(id))
		testenv.Must(t, err, "globex publishes once its stream exists")
		ids = append(ids, id)
	}
	testenv.Eventually(t, 10*time.Second, "globex's requests on OTP_REQUESTS", func() bool {
		st, err := js.Stream(ctx, events.StreamRequests)
		return err == nil && st.CachedInfo().State.Msgs == 6
	})
	testenv.Must(t, js.DeleteConsumer(ctx, events.StreamRequests, bad.Durable), "delete the hand-made consumer")
	_, err = platform.Provision(ctx, js, both)
	testenv.Must(t, err, "provision again")
	cons, err := js.Consumer(ctx, events.StreamRequests, bad.Durable)
	testenv.Must(t, err, "globex's durable")
	batch, err := cons.Fetch(3, jetstream.FetchMaxWait(5*time.Second))
	testenv.Must(t, err, "fetch")
	var got []string
	for m := range batch.Messages() {
		got = append(got, m.Headers().Get(jetstream.MsgIDHeader))
	}
	if !slices.Equal(got, ids) {
		t.Fatalf("globex's durable read %v, want %v", got, ids)
	}
}
