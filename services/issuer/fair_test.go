package issuer

import (
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
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
	pepper, err := keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	sealer, err := keys.ParseSealer(keys.Generate("s1", 32))
	testenv.Must(t, err, "sealer")
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subjects")
	svc, err := New(Config{Pepper: pepper, Sealer: sealer, Subjects: subjects, DLQKey: testenv.DLQKey(t),
		ConsumersCheckEvery: 200 * time.Millisecond}, testenv.Postgres(t, Spec()), js, testenv.Logger(io.Discard), nil)
	testenv.Must(t, err, "new issuer")
	testenv.Start(t, svc.Run)

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
