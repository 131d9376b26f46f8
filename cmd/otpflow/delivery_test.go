package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	gosmtp "github.com/emersion/go-smtp"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
)

// useSES puts the fault-injecting SES v2 server first in the chain, the SMTP server second.
func (w *world) useSES(t *testing.T) *sestest.Server {
	t.Helper()
	srv := sestest.New(t)
	for k, v := range awsTestCredentials {
		w.env[k] = v
	}
	w.env["OTP_PROVIDERS"] = "ses,smtp"
	w.env["OTP_SES_REGION"] = "eu-west-1"
	w.env["OTP_SES_ENDPOINT"] = srv.URL
	w.env["OTP_SES_MAX_SEND_RATE"] = "1000"
	return srv
}

// count is the number of messages stored on OTP_EVENTS under subject.
func count(t *testing.T, js jetstream.JetStream, subject string) int {
	t.Helper()
	st, err := js.Stream(context.Background(), events.StreamEvents)
	if err != nil {
		return 0
	}
	info, err := st.Info(context.Background(), jetstream.WithSubjectFilter(subject))
	if err != nil {
		return 0
	}
	return int(info.State.Subjects[subject])
}

func eventsOf[T any](t *testing.T, js jetstream.JetStream, subject string) []T {
	t.Helper()
	var out []T
	for _, m := range testenv.Messages(t, js, events.StreamEvents, subject) {
		var v T
		testenv.Must(t, json.Unmarshal(m.Data, &v), "decode %s", m.Subject)
		out = append(out, v)
	}
	return out
}

type phase struct {
	issuedPerSec float64
	p50, p95     time.Duration
	providers    map[string]int
}

// runPhase publishes n requests for tenant at once and measures how fast they are issued
// and how long each took from issue to delivery.
func runPhase(t *testing.T, a *app, tenant string, n int) phase {
	t.Helper()
	start := time.Now()
	a.burst(t, tenant, tenant, tenant, n)
	testenv.Eventually(t, 60*time.Second, tenant+" issued", func() bool { return count(t, a.js, "otp.issued."+tenant) == n })
	issuedIn := time.Since(start)
	testenv.Eventually(t, 120*time.Second, tenant+" delivered", func() bool { return count(t, a.js, "otp.delivered."+tenant) == n })

	issuedAt := map[string]time.Time{}
	for _, e := range eventsOf[events.Issued](t, a.js, "otp.issued."+tenant) {
		issuedAt[e.ChallengeID] = e.IssuedAt
	}
	p := phase{issuedPerSec: float64(n) / issuedIn.Seconds(), providers: map[string]int{}}
	var lat []time.Duration
	for _, d := range eventsOf[events.Delivered](t, a.js, "otp.delivered."+tenant) {
		p.providers[d.Provider]++
		lat = append(lat, d.DeliveredAt.Sub(issuedAt[d.ChallengeID]))
	}
	slices.Sort(lat)
	p.p50, p.p95 = lat[len(lat)/2], lat[len(lat)*95/100]
	return p
}

// TestPrimaryDownAllDeliveredViaSecondary: with SES answering 503 to everything, every
// request is mailed by the SMTP relay. The rates of both phases are logged, not asserted
// (speed belongs in benchmarks).
func TestPrimaryDownAllDeliveredViaSecondary(t *testing.T) {
	w := newWorld(t)
	srv := w.useSES(t)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())
	a.request(t, "warm", `{"request_id":"w","recipient":"w@example.com","purpose":"login"}`)
	testenv.Eventually(t, 30*time.Second, "warm-up", func() bool { return count(t, a.js, "otp.delivered.warm") == 1 })

	const n = 400
	healthy := runPhase(t, a, "healthy", n)
	srv.SetFault(sestest.Always(sestest.Unavailable))
	outage := runPhase(t, a, "outage", n)

	t.Logf("SES healthy: %.0f issued/s, issue->delivered p50 %v p95 %v, providers %v", healthy.issuedPerSec, healthy.p50, healthy.p95, healthy.providers)
	t.Logf("SES down:    %.0f issued/s, issue->delivered p50 %v p95 %v, providers %v", outage.issuedPerSec, outage.p50, outage.p95, outage.providers)
	if healthy.providers["ses"] != n {
		t.Fatalf("healthy phase went via %v", healthy.providers)
	}
	if outage.providers["smtp"] != n {
		t.Fatalf("outage phase went via %v, want all %d via smtp", outage.providers, n)
	}
	// That issuance does not wait on mail is shown without a clock by
	// TestBothProvidersDownThenBack: every request is issued while nothing can be mailed.
	if got := len(w.smtp.Mails()); got != n {
		t.Fatalf("SMTP got %d mails, want %d", got, n)
	}
}

// TestBothProvidersDownThenBack: SES and the relay both refuse for 20 s. Every request is
// issued meanwhile (the issuer never waits on mail). Nothing is lost, each code is mailed
// at most once, none after its expiry; a code that expired during the outage is reported
// as dispatch_expired instead.
func TestBothProvidersDownThenBack(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	srv := w.useSES(t)
	srv.SetFault(sestest.Always(sestest.Unavailable))
	w.env["OTP_BREAKER_OPEN_TIMEOUT"] = "3s"
	w.env["OTP_SEND_RETRY_BUDGET"] = "500ms"
	down := func(string) error {
		return &gosmtp.SMTPError{Code: 421, EnhancedCode: gosmtp.EnhancedCode{4, 3, 2}, Message: "service not available"}
	}
	w.smtp.SetReject(down)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())

	const n = 40 // half with the shortest lifetime (30 s), half with 5 minutes
	for i := range n {
		ttl := 30
		if i%2 == 1 {
			ttl = 300
		}
		a.request(t, "acme", fmt.Sprintf(`{"request_id":"o-%d","recipient":"o%d@example.com","purpose":"login","ttl_seconds":%d}`, i, i, ttl))
	}
	// The issuer never waits on mail: every request is issued while nothing can be mailed.
	testenv.Eventually(t, 20*time.Second, "every request issued during the outage", func() bool {
		return count(t, a.js, "otp.issued.acme") == n
	})
	if got := count(t, a.js, "otp.delivered.acme"); got != 0 {
		t.Fatalf("%d deliveries while both providers refuse", got)
	}
	time.Sleep(20 * time.Second) // the outage: both providers refuse for 20 s
	if got := len(w.smtp.Mails()); got != 0 {
		t.Fatalf("%d mails during the outage", got)
	}
	w.smtp.SetReject(nil)
	srv.SetFault(nil)

	testenv.Eventually(t, 90*time.Second, "every job settled", func() bool {
		return count(t, a.js, "otp.delivered.acme")+count(t, a.js, "otp.dispatch_expired.acme") == n
	})
	if len(srv.Emails())+len(w.smtp.Mails()) != count(t, a.js, "otp.delivered.acme") {
		t.Errorf("%d mails for %d deliveries", len(srv.Emails())+len(w.smtp.Mails()), count(t, a.js, "otp.delivered.acme"))
	}
	// otp.issued names a recipient by its subject hash only.
	subjects, err := keys.ParseSubjects(w.getenv("OTP_SUBJECT_KEY"))
	testenv.Must(t, err, "subject key")
	expires := map[string]time.Time{}
	for _, e := range eventsOf[events.Issued](t, a.js, "otp.issued.acme") {
		expires[e.RecipientHash] = e.ExpiresAt
	}
	mails := map[string]int{}
	for _, m := range w.smtp.Mails() {
		rcpt := m.To[0]
		mails[rcpt]++
		if !m.At.Before(expires[subjects.Subject("acme", rcpt)]) {
			t.Errorf("%s mailed at %v, after its code expired at %v", rcpt, m.At, expires[subjects.Subject("acme", rcpt)])
		}
	}
	for _, m := range srv.Emails() {
		mails[m.To[0]]++ // the SES fake refuses everything sent before the code expired
	}
	expired := map[string]bool{}
	for _, e := range eventsOf[events.DispatchExpired](t, a.js, "otp.dispatch_expired.acme") {
		expired[e.RequestID] = true
	}
	for i := range n {
		rcpt := fmt.Sprintf("o%d@example.com", i)
		switch {
		case i%2 == 1 && mails[rcpt] != 1:
			t.Errorf("%s (5 min code) got %d mails, want 1", rcpt, mails[rcpt])
		case mails[rcpt] > 1:
			t.Errorf("%s got %d mails", rcpt, mails[rcpt])
		case mails[rcpt] == 0 && !expired[fmt.Sprintf("o-%d", i)]:
			t.Errorf("%s got no mail and no dispatch_expired", rcpt)
		}
	}
	t.Logf("after a 20 s outage of every provider: %d mailed, %d expired unsent", len(mails), len(expired))
}

// TestDispatcherKilledMidBatch: of two dispatcher processes, one is killed with SIGKILL
// while sends are in flight. The other finishes its jobs once their leases lapse. A code
// mailed twice is the documented window (the relay took the mail, the dead process never
// recorded it), so duplicates are at most the sends the dead process had in flight.
func TestDispatcherKilledMidBatch(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	w.env["OTP_DISPATCH_CONCURRENCY"] = "8"
	w.smtp.SetDelay(50 * time.Millisecond) // keep sends in flight
	logs := &testenv.LogBuffer{}
	for _, name := range []string{"issuer", "verifier", "auditor"} {
		w.startService(t, name, logs)
	}
	victimLogs, survivorLogs := &testenv.LogBuffer{}, &testenv.LogBuffer{}
	victim := w.startService(t, "dispatcher", victimLogs)
	w.startService(t, "dispatcher", survivorLogs)
	a := newApp(t, w.nats.ClientURL())
	testenv.Eventually(t, 30*time.Second, "both dispatchers consuming", func() bool {
		return strings.Contains(victimLogs.String(), "dispatcher consuming") && strings.Contains(survivorLogs.String(), "dispatcher consuming")
	})

	const n = 300
	a.burst(t, "acme", "d", "d", n)
	// Kill the victim once it is busy: it has mailed some codes and has more in flight.
	deadline := time.Now().Add(60 * time.Second)
	for strings.Count(victimLogs.String(), `"msg":"delivered"`) < 10 {
		if time.Now().After(deadline) || victim.ProcessState != nil {
			t.Fatalf("the victim never got to work; its log:\n%s", victimLogs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = victim.Process.Kill()
	_ = victim.Wait()
	before := len(w.smtp.Mails())

	testenv.Eventually(t, 150*time.Second, "every request mailed", func() bool {
		return count(t, a.js, "otp.delivered.acme") == n
	})
	perRcpt := map[string]int{}
	for _, m := range w.smtp.Mails() {
		perRcpt[m.To[0]]++
	}
	dups := 0
	for i := range n {
		c := perRcpt[fmt.Sprintf("d%d@example.com", i)]
		if c == 0 {
			t.Fatalf("d%d got no mail", i)
		}
		dups += c - 1
	}
	t.Logf("killed one of two dispatchers after %d of %d mails; %d codes mailed twice (bound: 8 in flight)", before, n, dups)
	if dups > 8 {
		t.Fatalf("%d duplicates, more than the killed dispatcher had in flight", dups)
	}
	if !strings.Contains(survivorLogs.String(), `"msg":"delivered"`) {
		t.Fatal("the surviving dispatcher delivered nothing")
	}
}
