package issuer

import (
	"testing"

	"github.com/otpflow/otpflow/platform/keys"
)

// BenchmarkNewCode draws one 6-digit code from crypto/rand and takes its HMAC under the
// pepper: the per-code work of issuance before any database or NATS round trip.
//
//	cd services/issuer && go test -run '^$' -bench NewCode -benchmem
func BenchmarkNewCode(b *testing.B) {
	p, err := keys.ParsePepper(keys.Generate("p1", 32))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		code, err := newCode(6, "0123456789")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.MAC("p1", newID(), code); err != nil {
			b.Fatal(err)
		}
	}
}
