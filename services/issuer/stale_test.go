package issuer

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

// TestStaleRequestIsRejected: requests wait on OTP_REQUESTS while no issuer runs; when
// one comes back, a request that waited longer than its code's lifetime is refused as
// stale — published on otp.rejected, never mailed, no challenge — while one that waited
// less than its own lifetime is issued.
func TestStaleRequestIsRejected(t *testing.T) {
	h := newHarness(t)
	h.stop()
	h.request(t, `{"request_id":"r-stale","recipient":"ana@example.com","purpose":"login","ttl_seconds":60}`)
	h.request(t, `{"request_id":"r-fresh","recipient":"bo@example.com","purpose":"login","ttl_seconds":300}`)
	h.advance(2 * time.Minute) // the issuer's clock: both requests now waited two minutes
	h.start(t, h.subjectKey)

	rej := decode[events.Rejected](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.rejected.acme", 1, 10*time.Second)[0])
	if rej.RequestID != "r-stale" || rej.Reason != events.ReasonStale || rej.RequestSeq != 1 || !strings.Contains(rej.Detail, "1m0s") {
		t.Fatalf("rejected = %+v, want r-stale refused as stale", rej)
	}
	issued := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", 1, 10*time.Second)
	if is := decode[events.Issued](t, issued[0]); is.RequestID != "r-fresh" {
		t.Fatalf("issued %+v, want r-fresh", is)
	}
	jobs := testenv.WaitMessages(t, h.js, events.StreamDispatch, "", 1, 10*time.Second)
	if len(jobs) != 1 || h.openJob(t, jobs[0]).RequestID != "r-fresh" {
		t.Fatalf("%d dispatch jobs, want only r-fresh's", len(jobs))
	}
	var n int
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT count(*) FROM issuer.challenges WHERE request_id = 'r-stale'`).Scan(&n), "count")
	if n != 0 {
		t.Fatalf("the stale request made %d challenges", n)
	}
}

// backlogHarness runs an issuer whose OTP_REQUESTS keeps requests for bound, alerting at
// alertAt and checking every 100 ms.
func backlogHarness(t *testing.T, bound, alertAt time.Duration) (*harness, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	h := newTunedHarness(t, "", func(c *Config) {
		c.Streams.RequestsMaxAge, c.LagAlert, c.LagCheckEvery = bound, alertAt, 100*time.Millisecond
	}, reg)
	return h, reg
}

func backlogChecks(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather")
	for _, mf := range mfs {
		if mf.GetName() == "otpflow_consumer_backlog_checks_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}

func alerts(t *testing.T, js jetstream.JetStream) []events.Alert {
	t.Helper()
	var out []events.Alert
	for _, m := range testenv.Messages(t, js, events.StreamEvents, events.TypeAlert.Wildcard()) {
		out = append(out, decode[events.Alert](t, m))
	}
	return out
}

// TestBacklogAlertFiresBeforeRequestsAgeOut: the issuer stalls (its database holds it:
// every batch waits for a lock) while OTP_REQUESTS keeps requests for 8 s. The alert
// fires once the oldest unprocessed request has waited 2 s, while it is still on the
// stream; once the issuer is free again it issues the request.
func TestBacklogAlertFiresBeforeRequestsAgeOut(t *testing.T) {
	h, _ := backlogHarness(t, 8*time.Second, 2*time.Second)
	h.request(t, `{"request_id":"r1","recipient":"ana@example.com","purpose":"login"}`)
	testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", 1, 10*time.Second)

	ctx := context.Background()
	lock, err := h.pool.Begin(ctx)
	testenv.Must(t, err, "begin")
	defer func() { _ = lock.Rollback(ctx) }()
	_, err = lock.Exec(ctx, `LOCK TABLE issuer.challenges IN ACCESS EXCLUSIVE MODE`)
	testenv.Must(t, err, "lock")
	h.request(t, `{"request_id":"r2","recipient":"bo@example.com","purpose":"login","context":{"ip":"203.0.113.9"}}`)

	var got []events.Alert
	testenv.Eventually(t, 6*time.Second, "the backlog alert", func() bool {
		got = alerts(t, h.js)
		return len(got) > 0
	})
	// Raised before the request aged out: it is still on the stream.
	if reqs := testenv.Messages(t, h.js, events.StreamRequests, "otp.requested.acme"); len(reqs) != 2 || !strings.Contains(string(reqs[1].Data), `"r2"`) {
		t.Fatalf("%d requests on OTP_REQUESTS when the alert was read, want r2 still there", len(reqs))
	}
	a := got[0]
	if len(got) != 1 || a.Rule != RuleRequestsBacklog || a.Tenant != "_system" || a.Value < 2 || a.Value >= 8 || a.Threshold != 2 {
		t.Fatalf("alerts %+v", got)
	}
	testenv.AssertNoPlaintext(t, a.Detail, "bo@example.com", "203.0.113.9")

	testenv.Must(t, lock.Rollback(ctx), "unlock")
	testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", 2, 10*time.Second)
}

// TestNoBacklogAlertAtNormalLag: requests the issuer keeps up with raise no alert, though
// they stay on OTP_REQUESTS past the alert's age: what counts is the oldest request not
// yet processed, not the oldest one stored.
func TestNoBacklogAlertAtNormalLag(t *testing.T) {
	h, reg := backlogHarness(t, 8*time.Second, time.Second)
	for _, id := range []string{"r1", "r2", "r3"} {
		h.request(t, `{"request_id":"`+id+`","recipient":"`+id+`@example.com","purpose":"login"}`)
	}
	testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.issued.acme", 3, 10*time.Second)
	// Checks spanning more than twice the alert's age, with the processed requests
	// still stored all along.
	from := backlogChecks(t, reg)
	testenv.Eventually(t, 10*time.Second, "25 more backlog checks", func() bool { return backlogChecks(t, reg) >= from+25 })
	if n := len(testenv.Messages(t, h.js, events.StreamRequests, "")); n != 3 {
		t.Fatalf("%d requests stored, want the 3 processed ones", n)
	}
	if got := alerts(t, h.js); len(got) != 0 {
		t.Fatalf("alerts at normal lag: %+v", got)
	}
}
