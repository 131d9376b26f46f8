package verifier

import (
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// verifyFrom sends a verify for tenant acme over NATS with the client's IP.
func (h *harness) verifyFrom(t *testing.T, tenant, requestID, code, ip string) events.VerifyReply {
	t.Helper()
	body, _ := json.Marshal(events.VerifyRequest{RequestID: requestID, Code: code, Context: events.VerifyContext{IP: ip}})
	msg, err := h.nc.Request("otp.verify."+tenant, body, 10*time.Second)
	testenv.Must(t, err, "verify")
	var r events.VerifyReply
	testenv.Must(t, json.Unmarshal(msg.Data, &r), "reply %q", msg.Data)
	return r
}

// TestVerifyIPLimitHoldsAcrossReplicas: two verifier processes share one per-IP count;
// the call over it is answered rate_limited with a retry time and costs the challenge no
// attempt.
func TestVerifyIPLimitHoldsAcrossReplicas(t *testing.T) {
	tune := func(c *Config) { c.VerifyIPPerMinute = 4 }
	h := newConfigHarness(t, "", nil, tune)
	other, _ := h.replica(t, "", nil, tune)
	replicas := []*Service{h.svc, other}
	h.issue(t, ch(90), "r", 1, "135790", "", time.Now().Add(5*time.Minute))

	const ip = "203.0.113.7"
	verify := func(i int, code, ip string) events.VerifyReply {
		t.Helper()
		r, err := replicas[i%2].Verify(t.Context(), "acme", events.VerifyRequest{RequestID: "r", Code: code, Context: events.VerifyContext{IP: ip}})
		testenv.Must(t, err, "verify on replica %d", i%2)
		return r
	}
	for i := range 4 {
		if r := verify(i, "000000", ip); r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 5-i-1 {
			t.Fatalf("guess %d: %+v", i, r)
		}
	}
	for i := range 2 { // over the limit on either replica
		r := verify(i, "000000", ip)
		if r.Status != events.StatusRateLimited || r.RetryAfterSeconds < 1 || r.RetryAfterSeconds > 120 || r.Reason != "ip_per_minute" {
			t.Fatalf("fifth call from the IP on replica %d: %+v, want rate_limited with retry_after_seconds", i, r)
		}
	}
	var attempts int
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT attempts FROM verifier.challenges WHERE challenge_id = $1`, ch(90)).Scan(&attempts), "attempts")
	if attempts != 4 {
		t.Fatalf("attempts %d after 4 guesses and 2 limited calls, want 4", attempts)
	}
	// The one attempt left is still there for the user on another network.
	if r := verify(0, "135790", "198.51.100.9"); r.Status != events.StatusVerified {
		t.Fatalf("right code from another IP: %+v", r)
	}
	var plaintext int
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT count(*) FROM verifier.verify_limits
		WHERE position(convert_to($1, 'UTF8') IN key) > 0 OR length(key) <> 32`, ip).Scan(&plaintext), "keys")
	if plaintext != 0 {
		t.Fatal("a verify limit key holds the client IP")
	}
}

// TestVerifyLimitsOverNATS: through the micro service, an IPv6 client counts by its /64,
// and the tenant limit holds whatever the IPs; other tenants are not affected.
func TestVerifyLimitsOverNATS(t *testing.T) {
	h := newConfigHarness(t, "", nil, func(c *Config) { c.VerifyIPPerMinute = 2; c.VerifyTenantPerMinute = 5 })
	for i, ip := range []string{"2001:db8:1:2::1", "2001:db8:1:2:ffff::9"} {
		if r := h.verifyFrom(t, "acme", "unknown", "123456", ip); r.Status != events.StatusNotFound {
			t.Fatalf("call %d: %+v", i, r)
		}
	}
	r := h.verifyFrom(t, "acme", "unknown", "123456", "2001:db8:1:2::abcd")
	if r.Status != events.StatusRateLimited || r.Reason != "ip_per_minute" || r.RetryAfterSeconds < 1 {
		t.Fatalf("a third address of the same /64: %+v, want rate_limited", r)
	}
	// The tenant cap: two more calls from fresh IPs pass (5 in all), the next is refused.
	for i, ip := range []string{"192.0.2.1", "192.0.2.2"} {
		if r := h.verifyFrom(t, "acme", "unknown", "123456", ip); r.Status != events.StatusNotFound {
			t.Fatalf("tenant call %d: %+v", i, r)
		}
	}
	r = h.verifyFrom(t, "acme", "unknown", "123456", "192.0.2.3")
	if r.Status != events.StatusRateLimited || r.Reason != "tenant_per_minute" || r.RetryAfterSeconds < 1 {
		t.Fatalf("sixth call for the tenant: %+v, want rate_limited (tenant)", r)
	}
	if r := h.verifyFrom(t, "globex", "unknown", "123456", "192.0.2.3"); r.Status != events.StatusNotFound {
		t.Fatalf("another tenant: %+v", r)
	}
}

func TestSlidingWait(t *testing.T) {
	const w = time.Minute
	for _, tc := range []struct {
		name               string
		allowed, prev, cur int
		elapsed            time.Duration
		want               int
	}{
		{"first call", 5, 0, 1, 0, 0},
		{"at the cap", 5, 0, 5, 10 * time.Second, 0},
		{"over the cap, nothing before: next window, once this one weighs little", 5, 0, 6, 10 * time.Second, 50 + 20},
		{"over with the last window full: later in this window", 10, 10, 5, 0, 36},
		{"previous window weighs half", 10, 10, 5, 30 * time.Second, 0},
		{"far over: well into the next window", 5, 0, 50, 50 * time.Second, 66},
		{"rounds up to a whole second", 10, 10, 6, 23500 * time.Millisecond, 19},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := slidingWait(tc.allowed, tc.prev, tc.cur, tc.elapsed, w); got != tc.want {
				t.Fatalf("slidingWait(%d, %d, %d, %v) = %d, want %d", tc.allowed, tc.prev, tc.cur, tc.elapsed, got, tc.want)
			}
		})
	}
}

// TestUnknownRequestFloodDoesNotStarveVerifies: while the projection lags, every verify
// for an unknown request waits for it (up to FenceWait). A flood of unknown request ids
// must not take every worker: at most MaxFenceWaits wait, the rest answer not_found at
// once, and real verifications beside the flood answer well within FenceWait.
func TestUnknownRequestFloodDoesNotStarveVerifies(t *testing.T) {
	const fenceWait = 3 * time.Second
	var stalled atomic.Bool
	release := make(chan struct{})
	var holding atomic.Bool
	h := newConfigHarness(t, "", func() {
		if stalled.Load() {
			holding.Store(true)
			<-release
		}
	}, func(c *Config) { c.FenceWait = fenceWait })
	t.Cleanup(func() { close(release) }) // before the verifier stops

	const real = 10
	for i := range real {
		h.publishIssued(t, issue{ChallengeID: ch(100 + i), RequestID: fmt.Sprintf("real-%d", i), CodeSeq: 1,
			Recipient: fmt.Sprintf("real-%d@example.com", i), ExpiresAt: time.Now().Add(5 * time.Minute)}, "246810")
	}
	for i := range real {
		h.waitProjected(t, ch(100+i), 1)
	}
	// The projection stalls on the next event: unknown requests now wait on the fence.
	stalled.Store(true)
	h.publishIssued(t, issue{ChallengeID: ch(120), RequestID: "lagging", CodeSeq: 1, Recipient: "lag@example.com",
		ExpiresAt: time.Now().Add(5 * time.Minute)}, "246810")
	testenv.Eventually(t, 10*time.Second, "the projection to stall", holding.Load)

	stop := make(chan struct{})
	var flood sync.WaitGroup
	var floodBad atomic.Int64
	var floodN atomic.Int64
	for g := range 200 {
		flood.Add(1)
		go func() {
			defer flood.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				body, _ := json.Marshal(events.VerifyRequest{RequestID: fmt.Sprintf("flood-%d-%d", g, i), Code: "000000"})
				msg, err := h.nc.Request("otp.verify.acme", body, 30*time.Second)
				var r events.VerifyReply
				if err != nil || json.Unmarshal(msg.Data, &r) != nil || r.Status != events.StatusNotFound {
					floodBad.Add(1)
				}
				floodN.Add(1)
			}
		}()
	}
	const waiting = 16
	testenv.Eventually(t, 10*time.Second, "the flood to fill the fence", func() bool { return len(h.svc.fenceSlots) >= waiting })

	var wg sync.WaitGroup
	took := make([]time.Duration, real)
	replies := make([]events.VerifyReply, real)
	errs := make([]error, real)
	for i := range real {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body, _ := json.Marshal(events.VerifyRequest{RequestID: fmt.Sprintf("real-%d", i), Code: "246810"})
			start := time.Now()
			msg, err := h.nc.Request("otp.verify.acme", body, 30*time.Second)
			took[i] = time.Since(start)
			if errs[i] = err; err == nil {
				errs[i] = json.Unmarshal(msg.Data, &replies[i])
			}
		}()
	}
	wg.Wait()
	close(stop)
	flood.Wait()

	for i := range real {
		if errs[i] != nil || replies[i].Status != events.StatusVerified {
			t.Errorf("real verify %d beside the flood: %+v, %v", i, replies[i], errs[i])
		}
		if took[i] >= fenceWait {
			t.Errorf("real verify %d took %v beside the flood; a starved one takes the fence wait (%v)", i, took[i], fenceWait)
		}
	}
	if n := floodBad.Load(); n != 0 {
		t.Errorf("%d of %d flood verifies did not answer not_found", n, floodN.Load())
	}
	t.Logf("%d flood verifies; real ones took %v", floodN.Load(), took)
}
