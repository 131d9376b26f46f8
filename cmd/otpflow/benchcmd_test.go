package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
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

	dir := t.TempDir()
	res := runBench(t, getenv, "-bin", bin, "-dir", dir, "-requests", "300", "-warmup", "20", "-verify", "-verify-clients", "8",
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
	for _, f := range []string{"issuer.cpu.pprof", "dispatcher-2.cpu.pprof", "auditor.allocs.pprof", "verifier.verify.cpu.pprof", "bench.cpu.pprof"} {
		if st, err := os.Stat(filepath.Join(profiles, f)); err != nil || st.Size() == 0 {
			t.Errorf("profile %s: %v", f, err)
		}
	}
	// What -nats-only publishes in place of the services is their messages' size.
	natsOnlySizes(t, filepath.Join(dir, "nats"), "bench")
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
	return runBenchAs[benchResult](t, getenv, args...)
}

// runBenchAs runs bench -json with args and decodes the one object it prints as T.
func runBenchAs[T any](t *testing.T, getenv func(string) string, args ...string) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	code, err := run(ctx, append([]string{"bench", "-json"}, args...), getenv, &stdout, &stderr)
	if err != nil || code != 0 {
		t.Fatalf("bench: exit %d, %v\n%s", code, err, stderr.String())
	}
	var res T
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

// TestBenchNATSOnlyMovesEveryCode runs NATS alone: each durable consumer of the contract
// that a code's messages reach acknowledges as many messages as the contract routes to it
// (derived from the contract's streams and filters, not from the stages), the streams
// store a code's five messages, and the app reads each code's otp.delivered once.
func TestBenchNATSOnlyMovesEveryCode(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("-nats-only reads its CPU from /proc")
	}
	const n = 700
	profiles := t.TempDir()
	res := runBenchAs[natsOnlyResult](t, func(string) string { return "" },
		"-nats-only", "-requests", strconv.Itoa(n), "-profile", profiles, "-profile-seconds", "1")
	if res.Mode != "nats-only" || res.Requests != n || res.Delivered != n || res.Lost != 0 || res.Duplicates != 0 || !res.Drained {
		t.Errorf("outcome: %+v", res)
	}

	// What the contract routes to each durable: the subjects of one code's messages that
	// its stream stores and its filter takes.
	const tenant = "bench"
	code1 := []string{events.TypeRequested.Subject(tenant), events.TypeChallenge.Subject(tenant), events.TypeIssued.Subject(tenant),
		events.TypeDispatch.Subject(tenant), events.TypeDelivered.Subject(tenant)}
	streamOf := map[string]string{}
	for _, sc := range events.StreamConfigs(events.StreamOptions{}) {
		for _, subj := range code1 {
			for _, f := range sc.Subjects {
				if server.SubjectMatchesFilter(subj, f) {
					streamOf[subj] = sc.Name
				}
			}
		}
	}
	if len(streamOf) != len(code1) {
		t.Fatalf("streams of a code's subjects: %v", streamOf)
	}
	want := map[string]int{}
	for _, c := range events.ConsumerConfigs(events.StreamOptions{}) {
		filters := slices.Clone(c.Config.FilterSubjects)
		if c.Config.FilterSubject != "" {
			filters = append(filters, c.Config.FilterSubject)
		}
		per := 0
		for _, subj := range code1 {
			if streamOf[subj] != c.Stream {
				continue
			}
			if len(filters) == 0 || slices.ContainsFunc(filters, func(f string) bool { return server.SubjectMatchesFilter(subj, f) }) {
				per++
			}
		}
		if per > 0 {
			want[c.Stream+"/"+c.Config.Durable] = per * n
		}
	}
	if !maps.Equal(res.Handled, want) {
		t.Errorf("acknowledged per consumer %v, want %v", res.Handled, want)
	}
	readers := 2 // the app's: otp.issued and otp.delivered
	for _, v := range want {
		readers += v / n
	}
	if res.StoredPerCode != float64(len(code1)) || res.DeliveredPerCode != float64(readers) {
		t.Errorf("a code: %v messages stored, %v read; want %d and %d", res.StoredPerCode, res.DeliveredPerCode, len(code1), readers)
	}
	if !(res.CodesPerSec > 0 && res.DurationS > 0 && res.CPUSeconds > 0 && res.CPUMSPerCode > 0 && res.Cores > 0) ||
		math.Abs(res.BoxCodesPerSec-float64(res.Cores)*1000/res.CPUMSPerCode) > 1 {
		t.Errorf("figures: %+v", res)
	}
	if st, err := os.Stat(filepath.Join(profiles, "nats-only.cpu.pprof")); err != nil || st.Size() == 0 {
		t.Errorf("profile: %v", err)
	}

	// It runs no service: what only the pipeline has is refused.
	for _, args := range [][]string{{"-verify"}, {"-sink", "maildir"}, {"-dispatchers", "2"}, {"-send-delay", "1ms"}, {"-bin", "bin"}} {
		_, err := run(context.Background(), append([]string{"bench", "-nats-only"}, args...), func(string) string { return "" }, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "-nats-only runs no service") {
			t.Errorf("bench -nats-only %v: %v; want it refused", args, err)
		}
	}
}

// TestBenchNATSOnlyEndsOnAFailingStage: a stage whose publish fails ends the run with
// its error at once, rather than being retried until -settle and counted as lost.
func TestBenchNATSOnlyEndsOnAFailingStage(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("-nats-only reads its CPU from /proc")
	}
	broken := errors.New("the dispatcher stage cannot publish")
	orig := natsStagesOf
	t.Cleanup(func() { natsStagesOf = orig })
	natsStagesOf = func(tpl *natsTemplates) []natsStage {
		stages := orig(tpl)
		for i := range stages {
			if stages[i].service == "dispatcher" {
				stages[i].publish = func(context.Context, jetstream.JetStream, []*platform.Delivery) error { return broken }
			}
		}
		return stages
	}
	start := time.Now()
	var stdout, stderr bytes.Buffer
	_, err := run(t.Context(), []string{"bench", "-nats-only", "-json", "-requests", "200", "-settle", "2m"},
		func(string) string { return "" }, &stdout, &stderr)
	if !errors.Is(err, broken) {
		t.Fatalf("bench -nats-only with a failing stage: %v, want its error\n%s", err, stderr.String())
	}
	if stdout.Len() != 0 {
		t.Errorf("a failed run printed a result: %s", stdout.String())
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("the run took %v to end: it waited for -settle", d)
	}
}

// TestNATSOnlyMessagesAreEachCodes: each code's messages are valid JSON, hold none of the
// placeholders, and share no id, hash or random part with another code's, so that
// OTP_EVENTS's compression sees what it would in service; a redelivered request makes
// the same ids again, and a job names its code's request in otp.delivered.
func TestNATSOnlyMessagesAreEachCodes(t *testing.T) {
	tpl, err := newNATSTemplates("bench")
	testenv.Must(t, err, "templates")
	a, b := tpl.issuedCode("aaaaaaaan0000001"), tpl.issuedCode("bbbbbbbbn0000002")
	if again := tpl.issuedCode("aaaaaaaan0000001"); again.id != a.id {
		t.Errorf("a request issued again has id %s, first %s", again.id, a.id)
	}
	for _, m := range []*nats.Msg{tpl.challenge, tpl.issued, tpl.dispatch} {
		ma, mb := tpl.as(m, "k", a), tpl.as(m, "k", b)
		if !json.Valid(ma.Data) || !json.Valid(mb.Data) {
			t.Errorf("%s: not JSON: %s", m.Subject, ma.Data)
		}
		for _, p := range tpl.placeholders() {
			if bytes.Contains(ma.Data, []byte(p)) {
				t.Errorf("%s keeps placeholder %q", m.Subject, p)
			}
		}
		for i, v := range a.values {
			if i != 3 && i != 4 && bytes.Contains(ma.Data, []byte(v)) && bytes.Contains(mb.Data, []byte(v)) { // times may agree
				t.Errorf("%s: two codes share %q", m.Subject, v)
			}
		}
		if ma.Header.Get(jetstream.MsgIDHeader) == mb.Header.Get(jetstream.MsgIDHeader) {
			t.Errorf("%s: two codes under one message id", m.Subject)
		}
	}
	c, ok := tpl.deliveredCode(b.id)
	if !ok {
		t.Fatal("the code issued is not known to the dispatcher stage")
	}
	var d events.Delivered
	testenv.Must(t, json.Unmarshal(tpl.as(tpl.delivered, "delivered", c).Data, &d), "otp.delivered")
	if d.ChallengeID != b.id || d.RequestID != "bbbbbbbbn0000002" {
		t.Errorf("otp.delivered of code %s: %+v", b.id, d)
	}
	if _, ok := tpl.deliveredCode("00000000-1111-4000-8000-000000000000"); ok {
		t.Error("a job of no code issued is taken")
	}
}

// natsOnlySizes checks the stand-ins of -nats-only against what the pipeline stored in
// the NATS store under dir: each message's payload and headers within 10 % of the
// services' own.
func natsOnlySizes(t *testing.T, dir, tenant string) {
	t.Helper()
	s := testenv.NATSAt(t, dir, -1)
	nc, err := nats.Connect(s.ClientURL())
	testenv.Must(t, err, "connect")
	defer nc.Close()
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	tpl, err := newNATSTemplates(tenant)
	testenv.Must(t, err, "templates")
	c := tpl.issuedCode("0123abcdr0000042")
	for stream, m := range map[string]*nats.Msg{events.StreamChallenges: tpl.challenge, events.StreamEvents: tpl.issued} {
		compareSize(t, js, stream, m.Subject, tpl.as(m, "k", c))
	}
	dc, _ := tpl.deliveredCode(c.id)
	compareSize(t, js, events.StreamEvents, tpl.delivered.Subject, tpl.as(tpl.delivered, "delivered", dc))
}

func compareSize(t *testing.T, js jetstream.JetStream, stream, subject string, standIn *nats.Msg) {
	t.Helper()
	st, err := js.Stream(context.Background(), stream)
	testenv.Must(t, err, "stream %s", stream)
	real, err := st.GetLastMsgForSubject(context.Background(), subject)
	testenv.Must(t, err, "the last %s", subject)
	hdr := func(h nats.Header) (n int) {
		for k, vs := range h {
			if strings.HasPrefix(k, "Nats-") && k != jetstream.MsgIDHeader {
				continue // the server's own, on a read
			}
			for _, v := range vs {
				n += len(k) + len(v)
			}
		}
		return n
	}
	for what, pair := range map[string][2]int{"payload": {len(standIn.Data), len(real.Data)}, "headers": {hdr(standIn.Header), hdr(real.Header)}} {
		if d := math.Abs(float64(pair[0]-pair[1])) / float64(pair[1]); d > 0.10 {
			t.Errorf("%s %s: the stand-in's %d bytes, the pipeline's %d", subject, what, pair[0], pair[1])
		}
	}
}
