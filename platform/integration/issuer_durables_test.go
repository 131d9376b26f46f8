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
	// read fetches every message durable has to give, acknowledging them, and returns
	// their message ids.
	read := func(durable string, n int) []string {
		t.Helper()
		cons, err := js.Consumer(ctx, events.StreamRequests, durable)
		testenv.Must(t, err, "consumer %s", durable)
		batch, err := cons.FetchNoWait(n)
		testenv.Must(t, err, "fetch from %s", durable)
		var ids []string
		for m := range batch.Messages() {
			ids = append(ids, m.Headers().Get(jetstream.MsgIDHeader))
			testenv.Must(t, m.DoubleAck(ctx), "ack")
		}
		return ids
	}
	for i := range 3 {
		publish("acme", fmt.Sprintf("a%d", i))
		publish("globex", fmt.Sprintf("g%d", i))
	}
	// The issuer answered a0 g0 a1; g1 a2 g2 are unread.
	if got := read(events.ConsumerIssuer, 3); !slices.Equal(got, []string{"a0", "g0", "a1"}) {
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
		"create consumer issuer_acme on OTP_REQUESTS from sequence 4, where the durables it takes over from left off",
		"create consumer issuer_globex on OTP_REQUESTS from sequence 4, where the durables it takes over from left off",
		"delete consumer issuer on OTP_REQUESTS (read by issuer_acme, issuer_globex instead)",
	}
	if !slices.Equal(lines, want) {
		t.Fatalf("the plan's consumers:\n%s\nwant\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
	_, err = platform.Provision(ctx, js, tenants)
	testenv.Must(t, err, "provision tenant streams")
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
	if got := read("issuer_acme", 10); !slices.Equal(got, []string{"a2", "a3"}) {
		t.Fatalf("issuer_acme read %v, want what the shared durable had not: a2 a3", got)
	}
	if got := read("issuer_globex", 10); !slices.Equal(got, []string{"g1", "g2", "g3"}) {
		t.Fatalf("issuer_globex read %v, want g1 g2 g3", got)
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
	if got := read("issuer_globex", 10); !slices.Equal(got, []string{"g4"}) {
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

	// Tenant streams turned off again: the shared durable takes over where acme's left
	// off, and OTP_REQUESTS captures every tenant's requests itself once more. (globex's
	// g4, sourced after acme's a3, is read again: the durable that answered it is gone,
	// and the issuer knows it answered it.)
	testenv.Must(t, js.DeleteStream(ctx, events.TenantRequestsStream("acme")), "delete acme's stream")
	_, err = platform.Provision(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "provision the shared stream again")
	publish("acme", "a5")
	got := read(events.ConsumerIssuer, 10)
	if !slices.Contains(got, "a5") || slices.ContainsFunc(got, func(id string) bool { return id != "a5" && strings.HasPrefix(id, "a") }) {
		t.Fatalf("the shared durable, back, read %v: a5, and none of acme's answered requests", got)
	}
}
