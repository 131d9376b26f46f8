package issuer

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// backlogRig is OTP_REQUESTS holding two requests no issuer has processed, and the
// issuers' database.
func backlogRig(t *testing.T) (jetstream.JetStream, func(platform.AlertGate) *platform.BacklogWatch, func() *store) {
	t.Helper()
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	for _, id := range []string{"r1", "r2"} {
		_, err := js.Publish(context.Background(), "otp.requested.acme", []byte(`{"request_id":"`+id+`","recipient":"`+id+`@example.com","purpose":"login"}`))
		testenv.Must(t, err, "publish")
	}
	// The watch an issuer runs (issuer.Run), alerting at any age.
	watch := func(gate platform.AlertGate) *platform.BacklogWatch {
		return &platform.BacklogWatch{JS: js, Stream: events.StreamRequests, Consumer: events.ConsumerIssuer,
			Filter: events.IssuerConsumer.FilterSubject, Bound: time.Hour, AlertAt: time.Millisecond,
			Rule: RuleRequestsBacklog, Source: "otpflow/issuer", Gate: gate}
	}
	// The record of one issuer process on the shared database.
	issuer := func() *store { return &store{pool: pool, skew: func() time.Duration { return 0 }} }
	return js, watch, issuer
}

// TestBacklogAlertOnceAcrossIssuers: an issuer raises the backlog alert about the oldest
// request; that request is then processed, and the next one is as old. Another issuer —
// a replica, or the first one restarted — checks within the minute: no second alert,
// since the issuers share the record of the last one. Without the record that issuer
// raises one (its alert has another id, the stream keeps both), as the control shows.
func TestBacklogAlertOnceAcrossIssuers(t *testing.T) {
	ctx := context.Background()
	js, watch, issuer := backlogRig(t)
	first := watch(issuer())
	testenv.Eventually(t, 5*time.Second, "the alert about r1", func() bool {
		_, err := first.Check(ctx)
		testenv.Must(t, err, "check")
		return len(alerts(t, js)) > 0
	})

	// r1 is processed: r2 is the oldest now.
	cons, err := js.Consumer(ctx, events.StreamRequests, events.ConsumerIssuer)
	testenv.Must(t, err, "the issuer's consumer")
	m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
	testenv.Must(t, err, "pull r1")
	testenv.Must(t, m.DoubleAck(ctx), "settle r1")

	b, err := watch(issuer()).Check(ctx)
	testenv.Must(t, err, "check")
	if b.Oldest != 2 || b.Age < time.Millisecond {
		t.Fatalf("the second issuer found %+v, want request 2 waiting past the alert's age", b)
	}
	if got := alerts(t, js); len(got) != 1 {
		t.Fatalf("%d alerts, want the first issuer's only: %+v", len(got), got)
	}

	// The control: an issuer that keeps its record in memory raises a second alert.
	_, err = watch(nil).Check(ctx)
	testenv.Must(t, err, "check")
	if got := alerts(t, js); len(got) != 2 {
		t.Fatalf("%d alerts from an issuer without the shared record, want 2", len(got))
	}
}

// TestBacklogAlertWithoutItsDatabase: the record sits on the issuers' database, which may
// be what holds them up; out of reach, the watch raises the alert on its own.
func TestBacklogAlertWithoutItsDatabase(t *testing.T) {
	ctx := context.Background()
	js, watch, issuer := backlogRig(t)
	down := issuer()
	down.pool.Close()
	w := watch(down)
	testenv.Eventually(t, 5*time.Second, "the alert", func() bool {
		_, err := w.Check(ctx)
		testenv.Must(t, err, "check")
		return len(alerts(t, js)) > 0
	})
	if got := alerts(t, js); len(got) != 1 || got[0].Rule != RuleRequestsBacklog {
		t.Fatalf("alerts %+v", got)
	}
}
