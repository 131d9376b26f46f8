package dispatcher

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/ses"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// sesFirst runs a dispatcher whose chain is SES (the fault-injecting server) then SMTP.
func sesFirst(t *testing.T, srv *sestest.Server, guard mailer.GuardConfig) *harness {
	t.Helper()
	return sesFirstConfig(t, srv, Config{Guards: map[string]mailer.GuardConfig{"ses": guard}})
}

// sesFirstConfig is sesFirst with the rest of the dispatcher's configuration.
func sesFirstConfig(t *testing.T, srv *sestest.Server, dcfg Config) *harness {
	t.Helper()
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
	cfg := ses.Config{Region: "eu-west-1", Endpoint: srv.URL, Timeout: 500 * time.Millisecond}
	client, err := ses.NewClient(context.Background(), cfg)
	testenv.Must(t, err, "ses client")
	return newHarnessConfig(t, dcfg, func(smtp mailer.Provider) []mailer.Provider {
		return []mailer.Provider{ses.New(client, cfg), smtp}
	})
}

func (h *harness) deliveredVia(t *testing.T, n int) events.Delivered {
	t.Helper()
	return decode[events.Delivered](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", n, 15*time.Second)[n-1])
}

func challenge(i int) string { return fmt.Sprintf("00000000-0000-4000-8000-%012d", i) }

func TestFaultsRetryThenFailOverAndTrafficReturnsWhenSESHeals(t *testing.T) {
	srv := sestest.New(t)
	h := sesFirst(t, srv, mailer.GuardConfig{RetryInitial: 20 * time.Millisecond, RetryBudget: time.Second, BreakerTimeout: 1500 * time.Millisecond})
	expires := time.Now().Add(5 * time.Minute)

	// 503: retried in process (3 calls), then the SMTP relay.
	srv.SetFault(sestest.Always(sestest.Unavailable))
	h.publish(t, challenge(1), "u1@example.com", "100001", expires, "j1")
	d := h.deliveredVia(t, 1)
	if d.Provider != "smtp" || srv.Calls() != 3 {
		t.Fatalf("503: delivered via %s after %d SES calls, want smtp after 3", d.Provider, srv.Calls())
	}
	var steps []string
	for _, a := range d.ProviderAttempts {
		steps = append(steps, a.Provider+":"+a.Outcome)
	}
	if got := strings.Join(steps, " "); got != "ses:transient ses:transient ses:transient smtp:ok" {
		t.Fatalf("provider attempts %q", got)
	}
	// TooManyRequestsException: no retry against a throttling provider, straight to SMTP.
	srv.SetFault(sestest.Always(sestest.Throttled))
	h.publish(t, challenge(2), "u2@example.com", "100002", expires, "j2")
	if d := h.deliveredVia(t, 2); d.Provider != "smtp" || srv.Calls() != 4 {
		t.Fatalf("429: delivered via %s after %d SES calls, want smtp after 4", d.Provider, srv.Calls())
	}
	// A throttled provider is held back for a second (no configured rate to halve).
	time.Sleep(1100 * time.Millisecond)
	// A connection reset before any answer, with nothing accepted: it may have been
	// sent, so it is not failed over; one re-send follows and SES takes it.
	srv.SetFault(func(n int64, _ sestest.Email) sestest.Fault {
		if n == 5 {
			return sestest.Fault{Reset: true}
		}
		return sestest.Unavailable
	})
	h.publish(t, challenge(3), "u3@example.com", "100003", expires, "j3")
	time.Sleep(300 * time.Millisecond)
	if len(h.smtp.Mails()) != 2 {
		t.Fatalf("an ambiguous send was failed over to SMTP")
	}
	// The re-send meets 503s: retries, then SMTP. The breaker has seen enough to open.
	if d := h.deliveredVia(t, 3); d.Provider != "smtp" {
		t.Fatalf("after the reset: delivered via %s", d.Provider)
	}
	if h.svc.guards[0].State() != "open" {
		t.Fatalf("breaker %s after %d consecutive SES failures", h.svc.guards[0].State(), srv.Calls())
	}
	// Open breaker: SES costs nothing.
	calls := srv.Calls()
	h.publish(t, challenge(4), "u4@example.com", "100004", expires, "j4")
	if d := h.deliveredVia(t, 4); d.Provider != "smtp" || srv.Calls() != calls {
		t.Fatalf("open breaker: via %s, %d new SES calls", d.Provider, srv.Calls()-calls)
	}
	if f := testutil.ToFloat64(h.svc.fallbacks.WithLabelValues("ses", "smtp")); f != 4 {
		t.Fatalf("fallbacks metric = %v, want 4", f)
	}
	if v := testutil.ToFloat64(h.svc.breaker.WithLabelValues("ses")); v != 2 {
		t.Fatalf("breaker metric = %v, want 2 (open)", v)
	}

	// SES heals, slowly: answers take 200ms, inside the 500ms timeout. After the open
	// timeout, half-open probes succeed and traffic returns to SES.
	srv.SetFault(sestest.Always(sestest.Fault{Delay: 200 * time.Millisecond}))
	time.Sleep(1600 * time.Millisecond)
	for i := 5; i <= 7; i++ {
		h.publish(t, challenge(i), fmt.Sprintf("u%d@example.com", i), fmt.Sprintf("10000%d", i), expires, fmt.Sprintf("j%d", i))
		if d := h.deliveredVia(t, i); d.Provider != "ses" {
			t.Fatalf("after healing, job %d went via %s", i, d.Provider)
		}
	}
	if h.svc.guards[0].State() != "closed" || testutil.ToFloat64(h.svc.breaker.WithLabelValues("ses")) != 0 {
		t.Fatalf("breaker %s after SES healed", h.svc.guards[0].State())
	}
	if got := len(srv.Emails()); got != 3 {
		t.Fatalf("SES accepted %d mails, want 3", got)
	}
	if got := len(h.smtp.Mails()); got != 4 {
		t.Fatalf("SMTP got %d mails, want 4", got)
	}
}

func TestAmbiguousSendIsResentOnceWithTheSameCode(t *testing.T) {
	srv := sestest.New(t)
	h := sesFirst(t, srv, mailer.GuardConfig{})
	expires := time.Now().Add(5 * time.Minute)

	// Accepted, then the connection dropped: the re-send carries the same code.
	srv.SetFault(func(n int64, _ sestest.Email) sestest.Fault {
		if n == 1 {
			return sestest.Fault{AcceptThenReset: true}
		}
		return sestest.Fault{}
	})
	h.publish(t, challenge(11), "a1@example.com", "424242", expires, "a1")
	d := h.deliveredVia(t, 1)
	mails := srv.Emails()
	if d.Provider != "ses" || d.Unconfirmed || len(mails) != 2 {
		t.Fatalf("delivered %+v with %d SES mails, want a confirmed re-send", d, len(mails))
	}
	for _, m := range mails {
		// The tags SES reports back with its event notifications name the code.
		if m.Tags["tenant"] != "acme" || m.Tags["challenge_id"] != challenge(11) || m.Tags["code_seq"] != "1" {
			t.Fatalf("tags %v", m.Tags)
		}
		if !strings.Contains(m.Text, "424242") {
			t.Fatalf("the re-send carries another code: %q", m.Text)
		}
	}

	// No answer twice: counted as sent (unconfirmed), never a third mail, never failed over.
	srv.SetFault(sestest.Always(sestest.Fault{AcceptThenReset: true}))
	h.publish(t, challenge(12), "a2@example.com", "434343", expires, "a2")
	d = h.deliveredVia(t, 2)
	if !d.Unconfirmed || d.Attempts != 2 {
		t.Fatalf("delivered %+v, want unconfirmed after 2 attempts", d)
	}
	time.Sleep(2500 * time.Millisecond)
	if n := len(srv.Emails()); n != 4 {
		t.Fatalf("SES got %d mails in all, want 4 (2 per job)", n)
	}
	if n := len(h.smtp.Mails()); n != 0 {
		t.Fatalf("an ambiguous send was failed over (%d SMTP mails)", n)
	}
}

func TestSESPermanentRejectionIsReportedOnce(t *testing.T) {
	srv := sestest.New(t)
	srv.SetFault(sestest.Always(sestest.Rejected))
	h := sesFirst(t, srv, mailer.GuardConfig{})
	h.publish(t, challenge(21), "bad@example.com", "555555", time.Now().Add(5*time.Minute), "p1")
	f := decode[events.DeliveryFailed](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivery_failed.acme", 1, 10*time.Second)[0])
	if !f.Permanent || f.Provider != "ses" || !strings.Contains(f.Reason, "MessageRejected") {
		t.Fatalf("delivery_failed = %+v", f)
	}
	time.Sleep(1500 * time.Millisecond)
	if srv.Calls() != 1 || len(h.smtp.Mails()) != 0 {
		t.Fatalf("%d SES calls and %d SMTP mails after a permanent rejection, want 1 and 0", srv.Calls(), len(h.smtp.Mails()))
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.delivery_failed.acme")); n != 1 {
		t.Fatalf("%d delivery_failed events", n)
	}
}

// TestLeaseKeepsARedeliveredJobFromASecondSend: a job whose row another dispatcher holds
// waits for the lease instead of sending.
func TestLeaseKeepsARedeliveredJobFromASecondSend(t *testing.T) {
	h := newHarness(t)
	c := challenge(31)
	_, err := h.pool.Exec(context.Background(), `INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id,
		status, attempts, expires_at, claimed_at, lease_until) VALUES ($1, 1, 'acme', 'r', 'sending', 1, now() + interval '5 minutes', now(), now() + interval '2 seconds')`, c)
	testenv.Must(t, err, "insert a held claim")
	start := time.Now()
	h.publish(t, c, "l1@example.com", "616161", time.Now().Add(5*time.Minute), "l1")
	time.Sleep(time.Second)
	if n := len(h.smtp.Mails()); n != 0 {
		t.Fatalf("sent while another dispatcher held the lease")
	}
	d := h.deliveredVia(t, 1)
	if took := time.Since(start); took < 1900*time.Millisecond || d.Attempts != 2 || len(h.smtp.Mails()) != 1 {
		t.Fatalf("delivered after %v on attempt %d with %d mails", took, d.Attempts, len(h.smtp.Mails()))
	}
}
