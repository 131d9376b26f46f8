package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestBenchDrivesThePipeline runs otpflow bench as an operator would: the service
// binaries as separate processes, two dispatchers, the null sink handing every code back,
// and every code verified. Each request must come back delivered exactly once and
// verified, with each process's usage and profiles.
func TestBenchDrivesThePipeline(t *testing.T) {
	bin := binaries(t)
	d := testenv.NewDB(t)
	env := map[string]string{"OTP_DATABASE_URL": d.URL, "OTP_DB_ROLE_PREFIX": d.Prefix}
	getenv := func(k string) string { return env[k] }
	profiles := t.TempDir()

	res := runBench(t, getenv, "-bin", bin, "-dir", t.TempDir(), "-requests", "300", "-warmup", "20", "-verify", "-verify-clients", "8",
		"-dispatchers", "2", "-profile", profiles, "-profile-seconds", "1")
	if res.Requests != 300 || res.Accepted != 300 || res.Issued != 300 || res.Delivered != 300 || res.Lost != 0 || res.Duplicates != 0 || res.Rejected != 0 || res.Failed != 0 {
		t.Errorf("outcome: %+v", res)
	}
	if res.Verified != 300 || len(res.VerifyStatuses) != 1 {
		t.Errorf("verified %d, answers %v; want all 300 verified", res.Verified, res.VerifyStatuses)
	}
	if res.OTPsPerSec <= 0 || res.DurationS <= 0 || res.VerifyPerSec <= 0 {
		t.Errorf("rates: %+v", res)
	}
	for name, l := range map[string]benchLatency{"latency": res.LatencyMS, "verify latency": res.VerifyLatencyMS} {
		if !(0 < l.P50 && l.P50 <= l.P95 && l.P95 <= l.P99 && l.P99 <= l.Max) {
			t.Errorf("%s percentiles out of order: %+v", name, l)
		}
	}
	if res.LatencyMS.Max > res.DurationS*1000 {
		t.Errorf("a code took %.0f ms in a run of %.2f s", res.LatencyMS.Max, res.DurationS)
	}
	cpu := 0.0
	for _, name := range []string{"issuer", "dispatcher-1", "dispatcher-2", "verifier", "auditor"} {
		u, ok := res.Services[name]
		if !ok || u.PeakRSSMB <= 1 || u.CPUSeconds < 0 {
			t.Errorf("%s usage %+v (reported: %v)", name, u, ok)
		}
		cpu += u.CPUSeconds
	}
	if len(res.Services) != 5 || cpu <= 0 {
		t.Errorf("services %v", res.Services)
	}
	for _, f := range []string{"issuer.cpu.pprof", "dispatcher-2.cpu.pprof", "auditor.allocs.pprof", "verifier.verify.cpu.pprof"} {
		if st, err := os.Stat(filepath.Join(profiles, f)); err != nil || st.Size() == 0 {
			t.Errorf("profile %s: %v", f, err)
		}
	}
}

// TestBenchReadsTheMaildir runs the bench into the sandbox Maildir: the codes are read
// back from the mail files and verify.
func TestBenchReadsTheMaildir(t *testing.T) {
	bin := binaries(t)
	d := testenv.NewDB(t)
	env := map[string]string{"OTP_DATABASE_URL": d.URL, "OTP_DB_ROLE_PREFIX": d.Prefix}
	res := runBench(t, func(k string) string { return env[k] }, "-bin", bin, "-dir", t.TempDir(), "-sink", "maildir", "-requests", "50", "-warmup", "0", "-verify", "-rate", "200")
	if res.Delivered != 50 || res.Lost != 0 || res.Duplicates != 0 || res.Verified != 50 {
		t.Errorf("maildir run: %+v", res)
	}
}

func runBench(t *testing.T, getenv func(string) string, args ...string) benchResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	code, err := run(ctx, append([]string{"bench", "-json"}, args...), getenv, &stdout, &stderr)
	if err != nil || code != 0 {
		t.Fatalf("bench: exit %d, %v\n%s", code, err, stderr.String())
	}
	var res benchResult
	dec := json.NewDecoder(&stdout)
	dec.DisallowUnknownFields()
	testenv.Must(t, dec.Decode(&res), "bench -json output %q", stdout.String())
	if dec.More() {
		t.Errorf("bench -json printed more than one object: %q", stdout.String())
	}
	return res
}

// TestBenchCountsLossesAndDuplicates feeds the ledger, as OTP_EVENTS and the null sink
// would, what a broken pipeline produces: a request stored with no outcome, a code
// reported delivered that never reached the sink, a code mailed twice, another code
// reported delivered twice, and a mail for a challenge the ledger learns of only later.
func TestBenchCountsLossesAndDuplicates(t *testing.T) {
	l := newBenchLedger("x")
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	event := func(typ events.Type, v any) {
		b, err := json.Marshal(v)
		testenv.Must(t, err, "marshal")
		l.add(string(typ)+".bench", b)
	}
	issue := func(req, challenge string) {
		event(events.TypeIssued, events.Issued{ChallengeID: challenge, Tenant: "bench", RequestID: req, CodeSeq: 1, RequestedAt: at, IssuedAt: at.Add(time.Millisecond)})
	}
	deliver := func(req, challenge string) {
		event(events.TypeDelivered, events.Delivered{ChallengeID: challenge, Tenant: "bench", RequestID: req, CodeSeq: 1, DeliveredAt: at.Add(50 * time.Millisecond)})
	}
	mail := func(challenge string) { l.mailed(challenge, "123456", at.Add(10*time.Millisecond)) }

	mail("c1") // before its otp.issued: matched once the ledger knows c1
	issue("x1", "c1")
	deliver("x1", "c1")
	issue("x2", "c2")
	deliver("x2", "c2") // the provider said yes; nothing arrived
	issue("x3", "c3")
	deliver("x3", "c3")
	mail("c3")
	mail("c3") // mailed twice
	issue("x4", "c4")
	deliver("x4", "c4")
	deliver("x4", "c4") // reported twice
	mail("c4")
	issue("x5", "c5") // no outcome
	issue("x6", "c6")
	event(events.TypeDeliveryFailed, events.DeliveryFailed{ChallengeID: "c6", Tenant: "bench", RequestID: "x6", CodeSeq: 1, Reason: "x"})
	event(events.TypeRejected, events.Rejected{Tenant: "bench", RequestID: "x7", Reason: events.ReasonInvalidRecipient})
	event(events.TypeIssued, events.Issued{ChallengeID: "o1", Tenant: "bench", RequestID: "other-run", CodeSeq: 1}) // not this run's
	l.match()

	res := benchResult{Accepted: 8} // x8: stored, never issued nor rejected
	l.summarise(&res, time.Second, false)
	if res.Issued != 6 || res.Delivered != 4 || res.Failed != 1 || res.Rejected != 1 {
		t.Errorf("issued %d, delivered %d, failed %d, rejected %d; want 6, 4, 1, 1", res.Issued, res.Delivered, res.Failed, res.Rejected)
	}
	if res.Lost != 3 || res.Duplicates != 2 {
		t.Errorf("seeing the sink: lost %d (want 3: x2, x5, x8), duplicates %d (want 2: c3 mailed twice, c4 reported twice)", res.Lost, res.Duplicates)
	}
	// The null sink's clock ends a mailed code's latency; c2, never mailed, ends at its event.
	if res.LatencyMS.P50 != 10 || res.LatencyMS.Max != 50 {
		t.Errorf("latency %+v, want p50 10 ms (the sink's answer), max 50 ms", res.LatencyMS)
	}
	// Blind to the sink (a remote relay), only the events count.
	res = benchResult{Accepted: 8}
	l.summarise(&res, time.Second, true)
	if res.Lost != 2 || res.Duplicates != 2 {
		t.Errorf("blind to the sink: lost %d (want 2), duplicates %d (want 2)", res.Lost, res.Duplicates)
	}
}

// TestBenchKeepsOffALivePipeline: the bench's services use new keys and the null
// provider, so it refuses to run in production, or on a NATS server where another
// pipeline's dispatcher is pulling jobs (the bench's would take them, and hand the codes
// it could open to the bench instead of mailing them).
func TestBenchKeepsOffALivePipeline(t *testing.T) {
	var stderr bytes.Buffer
	_, err := run(context.Background(), []string{"bench", "-bin", t.TempDir()}, func(k string) string {
		return map[string]string{"OTP_ENV": "production"}[k]
	}, io.Discard, &stderr)
	if err == nil || !strings.Contains(err.Error(), "OTP_ENV=production") {
		t.Errorf("bench with OTP_ENV=production: %v", err)
	}

	ns := testenv.NATS(t)
	nc, js := testenv.JetStream(t, ns)
	ctx := context.Background()
	testenv.Must(t, provisionStreams(ctx, js, events.StreamOptions{}, io.Discard), "provision")
	if err := natsInUse(ctx, js); err != nil {
		t.Fatalf("a server nobody pulls from: %v", err)
	}
	cons, err := js.Consumer(ctx, events.StreamDispatch, events.ConsumerDispatcher)
	testenv.Must(t, err, "dispatcher durable")
	pulling := make(chan struct{})
	go func() {
		defer close(pulling)
		_, _ = cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second)) // another pipeline's dispatcher, waiting for jobs
	}()
	testenv.Eventually(t, 5*time.Second, "the bench to see the other dispatcher", func() bool {
		err := natsInUse(ctx, js)
		return err != nil && strings.Contains(err.Error(), "another pipeline reads dispatcher")
	})
	nc.Close()
	<-pulling
}
