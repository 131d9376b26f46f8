package events_test

import (
	"testing"

	"github.com/otpflow/otpflow/events"
)

// BenchmarkDecodeRequested decodes and validates one otp.requested body as an app sends it,
// with the optional context and metadata: the issuer's first step for every request.
//
//	cd events && go test -run '^$' -bench DecodeRequested -benchmem
func BenchmarkDecodeRequested(b *testing.B) {
	body := []byte(`{"request_id":"signup-7f3a","recipient":"ana@example.com","purpose":"login","locale":"en","ttl_seconds":300,` +
		`"context":{"ip":"203.0.113.7","user_agent":"Mozilla/5.0 (X11; Linux x86_64)","session_id":"s-1"},"metadata":{"app":"web"}}`)
	b.ReportAllocs()
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		if _, err := events.DecodeRequested(body); err != nil {
			b.Fatal(err)
		}
	}
}
