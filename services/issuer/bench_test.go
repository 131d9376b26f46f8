package issuer

import (
	"fmt"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// BenchmarkIssue measures the issuer alone: b.N requests for distinct recipients published
// at once, until every otp.issued is stored. "limits-off" turns every rate limit and risk
// rule off to show what they cost.
//
//	cd services/issuer && go test -run '^$' -bench Issue -benchtime 5000x
func BenchmarkIssue(b *testing.B) {
	for _, tc := range []struct{ name, policy string }{
		{"defaults", ""},
		{"limits-off", `defaults:
  rate_limits: {recipient_cooldown: 0s, recipient_per_hour: 0, ip_per_minute: 0, recipient_failures_per_hour: 0}
  risk: {ip_fanout: {recipients: 0}, recipient_burst: {challenges: 0}, recipient_failures: {failures: 0}}`},
	} {
		b.Run(tc.name, func(b *testing.B) {
			h := newPolicyHarnessTB(b, tc.policy)
			b.ResetTimer()
			start := time.Now()
			for i := range b.N {
				if _, err := h.js.PublishAsync("otp.requested.bench", []byte(fmt.Sprintf(`{"request_id":"b-%d","recipient":"u%d@example.com","purpose":"login","context":{"ip":"10.0.%d.%d"}}`, i, i, i/250, i%250))); err != nil {
					b.Fatal(err)
				}
			}
			<-h.js.PublishAsyncComplete()
			testenv.Eventually(b, 5*time.Minute, "all issued", func() bool {
				st, _ := h.js.Stream(b.Context(), events.StreamEvents)
				info, err := st.Info(b.Context())
				return err == nil && int(info.State.Msgs) >= b.N
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "issued/s")
		})
	}
}
