package events_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
)

// goldenPayloads are one filled value of each wire type; testdata/<name>.json guards their
// encoding. Run with -update after an intended change.
func goldenPayloads() map[string]any {
	at := time.Date(2026, 11, 26, 10, 2, 0, 0, time.UTC)
	exp := at.Add(5 * time.Minute)
	const ch = "2eedf1ad-5135-4c42-a28f-5b09316ec196"
	return map[string]any{
		"otp.requested": events.Requested{RequestID: "signup-7f3a", Recipient: "ana@example.com", Purpose: "login", Locale: "en",
			TTLSeconds: 300, Context: events.RequestContext{IP: "203.0.113.7", UserAgent: "Mozilla/5.0", SessionID: "s-1"},
			Metadata: map[string]string{"app": "web"}},
		"otp.dispatch": events.SealedDispatch{Format: events.DispatchFormat, Tenant: "acme", SealKeyID: "s1", Sealed: []byte{1, 2, 3}},
		"otp.dispatch.sealed-job": events.DispatchJob{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1, Recipient: "ana@example.com",
			Purpose: "login", Locale: "en", IssuedAt: at, ExpiresAt: exp, Code: "493027"},
		"otp.issued": events.Issued{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1, Recipient: "ana@example.com",
			Purpose: "login", Locale: "en", CodeLength: 6, CodeHMAC: []byte{9, 9}, PepperKeyID: "p1", MaxAttempts: 5, SessionID: "s-1",
			ClientIP: "203.0.113.7", IssuedAt: at, ExpiresAt: exp},
		"otp.rejected": events.Rejected{Tenant: "acme", RequestID: "signup-7f3a", Reason: events.ReasonHeaderInjection, Field: "recipient",
			Detail: "contains CR or LF", RequestSeq: 42, RejectedAt: at},
		"otp.delivered": events.Delivered{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1, Provider: "smtp",
			ProviderMessageID: "<1@acme>", Attempts: 1, DeliveredAt: at},
		"otp.verify_failed": events.VerifyFailed{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", Status: events.StatusInvalidCode,
			Attempts: 1, AttemptsRemaining: 4, FailedAt: at},
		"otp.verified":       events.Verified{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1, Attempts: 2, VerifiedAt: at},
		"otp.verify.request": events.VerifyRequest{RequestID: "signup-7f3a", Code: "493027", Context: events.VerifyContext{SessionID: "s-1"}},
		"otp.verify.reply":   events.VerifyReply{Status: events.StatusVerified},
	}
}

func TestGoldenWireFormat(t *testing.T) {
	for name, v := range goldenPayloads() {
		got, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, '\n')
		path := filepath.Join("testdata", name+".json")
		if *update {
			if err := os.WriteFile(path, got, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%s: %v (run with -update)", path, err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s changed on the wire:\n got %s\nwant %s", name, got, want)
		}
	}
	// The golden request is what an app sends: it must pass the strict decoder.
	b, _ := os.ReadFile(filepath.Join("testdata", "otp.requested.json"))
	if _, err := events.DecodeRequested(b); err != nil {
		t.Fatalf("golden request refused: %v", err)
	}
	b, _ = os.ReadFile(filepath.Join("testdata", "otp.verify.request.json"))
	if _, err := events.DecodeVerifyRequest(b); err != nil {
		t.Fatalf("golden verify request refused: %v", err)
	}
}
