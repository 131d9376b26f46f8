package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

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

// TestBenchCountsLossesAndDuplicates feeds the ledger what a broken pipeline would:
// a request stored with no outcome, a code reported delivered that never reached the
// sink, a code mailed twice, and a second otp.delivered for one code.
func TestBenchCountsLossesAndDuplicates(t *testing.T) {
	l := newBenchLedger("x")
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	code := func(req, challenge, outcome string, mailed int) {
		c := l.code(req)
		c.challengeID, c.outcome, c.mailed = challenge, outcome, mailed
		c.requestedAt, c.deliveredAt = at, at.Add(10*time.Millisecond)
		l.challenges[challenge] = c
		if outcome != "" {
			l.settled++
		}
		if outcome == "delivered" {
			l.delivered++
		}
		l.issued++
	}
	code("x1", "c1", "delivered", 1)
	code("x2", "c2", "delivered", 0) // the provider said yes; nothing arrived
	code("x3", "c3", "delivered", 2) // mailed twice
	code("x4", "c4", "", 0)          // no outcome
	code("x5", "c5", "delivery_failed", 0)
	l.rejected["x6"] = "invalid_recipient"

	var res benchResult
	res.Accepted = 7 // x7: stored, never issued nor rejected
	l.summarise(&res, time.Second, false)
	if res.Lost != 3 || res.Duplicates != 1 || res.Failed != 1 || res.Rejected != 1 || res.Delivered != 3 {
		t.Errorf("seeing the sink: lost %d (want 3), duplicates %d (want 1), failed %d, rejected %d, delivered %d", res.Lost, res.Duplicates, res.Failed, res.Rejected, res.Delivered)
	}
	// Blind to the sink (a remote relay), only the events count; a second otp.delivered
	// for one code is a duplicate.
	l.extraDeliv = 2
	res = benchResult{Accepted: 7}
	l.summarise(&res, time.Second, true)
	if res.Lost != 2 || res.Duplicates != 2 {
		t.Errorf("blind to the sink: lost %d (want 2), duplicates %d (want 2)", res.Lost, res.Duplicates)
	}
	if res.LatencyMS.P50 != 10 || res.LatencyMS.Max != 10 {
		t.Errorf("latency %+v, want 10 ms", res.LatencyMS)
	}
}
