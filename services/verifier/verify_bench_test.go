package verifier

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// BenchmarkVerify is the verify transaction through the service, as apps call it: b.N
// projected codes, each verified once with the right code by 32 clients at a time, on a
// real NATS server and PostgreSQL. It reports verifications a second.
//
//	cd services/verifier && go test -run '^$' -bench Verify -benchtime 5000x -count 3
func BenchmarkVerify(b *testing.B) {
	h := newHarness(b)
	expires := time.Now().Add(time.Hour)
	challenge := func(i int) string { return fmt.Sprintf("%08x-0000-4000-8000-%012x", i, i) }
	for i := range b.N {
		h.publishIssued(b, issue{ChallengeID: challenge(i), RequestID: fmt.Sprintf("r%d", i), CodeSeq: 1,
			Recipient: fmt.Sprintf("u%d@example.com", i), ExpiresAt: expires}, "123456")
	}
	testenv.Eventually(b, 5*time.Minute, "every code projected", func() bool {
		var n int
		_ = h.pool.QueryRow(context.Background(), `SELECT count(*) FROM verifier.codes`).Scan(&n)
		return n == b.N
	})
	var next atomic.Int64
	b.SetParallelism(max(1, 32/runtime.GOMAXPROCS(0))) // 32 clients in all
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := int(next.Add(1) - 1)
			body, _ := json.Marshal(events.VerifyRequest{RequestID: fmt.Sprintf("r%d", i), Code: "123456"})
			msg, err := h.nc.Request("otp.verify.acme", body, 10*time.Second)
			if err != nil {
				b.Errorf("verify r%d: %v", i, err)
				continue
			}
			var r events.VerifyReply
			if err := json.Unmarshal(msg.Data, &r); err != nil || r.Status != events.StatusVerified {
				b.Errorf("verify r%d: %q", i, msg.Data)
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "verifies/s")
}
