package keys_test

import (
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
)

// The per-code cryptography: the code's HMAC under the pepper (issuer, and the verifier on
// every try), and the dispatch job sealed by the issuer and opened by the dispatcher.
//
//	cd platform/keys && go test -run '^$' -bench . -benchmem

func BenchmarkPepperMAC(b *testing.B) {
	p, err := keys.ParsePepper(keys.Generate("p1", 32))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.MAC("p1", "5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6", "424242"); err != nil {
			b.Fatal(err)
		}
	}
}

func benchJob() events.DispatchJob {
	at := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	return events.DispatchJob{ChallengeID: "5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6", Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1,
		Recipient: "ana@example.com", Purpose: "login", Locale: "en", IssuedAt: at, ExpiresAt: at.Add(5 * time.Minute), Code: "424242"}
}

func BenchmarkSealJob(b *testing.B) {
	s, err := keys.ParseSealer(keys.Generate("s1", 32))
	if err != nil {
		b.Fatal(err)
	}
	job := benchJob()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.SealJob(job); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpenJob(b *testing.B) {
	s, err := keys.ParseSealer(keys.Generate("s1", 32))
	if err != nil {
		b.Fatal(err)
	}
	sealed, err := s.SealJob(benchJob())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.OpenJob(sealed); err != nil {
			b.Fatal(err)
		}
	}
}
