package events_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"slices"
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
		"otp.issued": events.Issued{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1,
			RecipientHash: "k1:3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", RecipientMasked: "a***@example.com",
			ClientHash: "k1:q83vEjRWeJAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Purpose: "login", Locale: "en", CodeLength: 6, MaxAttempts: 5,
			IssuedAt: at, ExpiresAt: exp},
		"otp.challenge": events.Challenge{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1, CodeLength: 6,
			CodeHMAC: []byte{9, 9}, PepperKeyID: "p1", MaxAttempts: 5, SessionID: "s-1",
			RecipientHashes: []string{"k2:un-vyv7-3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "k1:3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
			IssuedAt:        at, ExpiresAt: exp, Risk: []string{"recipient_burst"}},
		"otp.challenge_superseded": events.Superseded{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", SupersededBy: "signup-8b41",
			SupersededAt: at},
		"otp.rejected": events.Rejected{Tenant: "acme", RequestID: "signup-7f3a", Reason: events.ReasonHeaderInjection, Field: "recipient",
			Detail: "contains CR or LF", RequestSeq: 42, RejectedAt: at},
		"otp.rejected.stale": events.Rejected{Tenant: "acme", RequestID: "signup-7f3a", Reason: events.ReasonStale,
			Detail: "waited 6m2s on OTP_REQUESTS, longer than its code's lifetime of 5m0s", RequestSeq: 43, RejectedAt: at},
		"otp.delivered": events.Delivered{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1, Provider: "smtp",
			ProviderMessageID: "<1@acme>", Attempts: 1, DeliveredAt: at},
		"otp.verify_failed": events.VerifyFailed{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", Status: events.StatusInvalidCode,
			Attempts: 1, AttemptsRemaining: 4, FailedAt: at},
		"otp.verified":       events.Verified{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1, Attempts: 2, VerifiedAt: at},
		"otp.verify.request": events.VerifyRequest{RequestID: "signup-7f3a", Code: "493027", Context: events.VerifyContext{SessionID: "s-1"}},
		"otp.verify.reply":   events.VerifyReply{Status: events.StatusVerified},
		"otp.status.request": events.StatusRequest{RequestID: "req-1"},
		"otp.status.reply": events.StatusReply{RequestID: "req-1", Found: true, State: events.StateBounced, At: at,
			Detail: "Permanent/General", CodeSeq: 1, ExpiresAt: at.Add(5 * time.Minute),
			LastRefusal: &events.StatusRefusal{Reason: events.ReasonSuppressed, Detail: "recipient is suppressed", At: at}},
		"otp.superseded": events.Superseded{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", SupersededBy: "signup-8b41",
			SupersededAt: at, Test: true},
		"otp.delivery_failed": events.DeliveryFailed{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 2, Provider: "ses",
			Reason: "550 5.1.1 <address>: Recipient address rejected", Permanent: true, Attempts: 3, FailedAt: at,
			ProviderAttempts: []events.ProviderAttempt{{Provider: "ses", Outcome: "transient", At: at.Add(-2 * time.Second)},
				{Provider: "ses", Outcome: "permanent", At: at}}},
		"otp.dispatch_expired": events.DispatchExpired{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", CodeSeq: 1, Attempts: 4,
			ExpiresAt: exp, ExpiredAt: exp.Add(time.Second)},
		"otp.locked": events.Locked{ChallengeID: ch, Tenant: "acme", RequestID: "signup-7f3a", Attempts: 5, LockedAt: at, Test: true},
		"otp.alert": events.Alert{Tenant: "_system", Rule: "delivery_failure_ratio", Severity: "warning",
			Detail: "provider ses failed 15 of 20 calls within 5m0s", Value: 0.75, Threshold: 0.5, RaisedAt: at},
		"otp.feedback": events.Feedback{Tenant: "acme", ChallengeID: ch, CodeSeq: 1, Kind: events.FeedbackBounced,
			RecipientHash: "k1:3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Provider: "ses",
			ProviderMessageID: "0100018c-example-000000", BounceType: "Permanent", BounceSubType: "General",
			Diagnostic: "5.1.1 smtp; 550 5.1.1 <address>: user unknown", SentAt: at, OccurredAt: at.Add(time.Minute),
			ReceivedAt: at.Add(61 * time.Second)},
		"otp.alert.subject": events.Alert{Tenant: "acme", Rule: "request_burst_ip", Severity: "warning",
			Detail: "31 codes issued for one client network within 1m0s", Value: 31, Threshold: 30, RaisedAt: at,
			SubjectHash: "k1:3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
		"otp.dlq": events.SealedDeadLetter{Format: events.DeadLetterFormat, Tenant: "acme", KeyID: "d1", Sealed: []byte{1, 2, 3}},
		"otp.dlq.sealed-message": events.DeadLetter{Subject: "otp.requested.acme", Header: map[string][]string{"Nats-Msg-Id": {"signup-7f3a"}},
			Data: []byte(`{"request_id":"signup-7f3a","recipient":"ana@example.com","purpose":"login"}`)},
		"otp.operator_action": events.OperatorAction{Action: "audit.erase", Identity: events.OperatorIdentity{User: "alice",
			Host: "ops-1", NATSUser: "operator"}, Tenant: "_system", Detail: "4 rows", At: at},
		"otp.operator_action.redrive": events.OperatorAction{Action: events.ActionDLQRedrive, Identity: events.OperatorIdentity{User: "alice",
			Host: "ops-1", NATSUser: "operator"}, Tenant: "acme", Detail: "OTP_DLQ 7 (otp.verified.acme, consumer auditor) redriven: OTP_EVENTS 1042",
			At: at, Redrive: &events.RedriveRef{Stream: "OTP_EVENTS", StreamSeq: 1042, EventID: "verified:c-1:1", Consumer: "auditor", DLQSeq: 7}},
		"otp.erasure_requested": events.ErasureRequested{ErasureID: "5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6", Tenant: "acme",
			RecipientHashes: []string{"k2:3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "k1:u7u7u7u7AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
			Identity:        events.OperatorIdentity{User: "alice", Host: "ops-1", NATSUser: "operator"}, RequestedAt: at},
		"otp.erased": events.Erased{ErasureID: "5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6", Tenant: "acme", Service: "issuer", Rows: 3,
			ErasedAt: at.Add(time.Second)},
		"otp.audit.checkpoint": events.AuditCheckpoint{Pos: 1000, RowHash: []byte{1, 2, 3}, StreamSeq: 1042, ChainKeyID: "c1", At: at,
			SigningKeyID: "sig1", Signature: []byte{4, 5, 6}},
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

// TestGoldenCoversEveryWireType fails when a payload type lacks a golden value: every
// exported struct in payloads.go must be a golden value or a field of one, every type of
// the audit stream needs a golden file named after it, and DecodeEventOf must give back
// that very value from the file.
func TestGoldenCoversEveryWireType(t *testing.T) {
	golden := goldenPayloads()
	covered := map[string]bool{}
	var walk func(reflect.Type)
	walk = func(rt reflect.Type) {
		switch rt.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Array, reflect.Map:
			walk(rt.Elem())
		case reflect.Struct:
			if rt.PkgPath() != reflect.TypeFor[events.Issued]().PkgPath() || covered[rt.Name()] {
				return
			}
			covered[rt.Name()] = true
			for f := range rt.Fields() {
				walk(f.Type)
			}
		}
	}
	for _, v := range golden {
		walk(reflect.TypeOf(v))
	}
	f, err := parser.ParseFile(token.NewFileSet(), "payloads.go", nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != token.TYPE {
			continue
		}
		for _, s := range g.Specs {
			ts := s.(*ast.TypeSpec)
			if _, isStruct := ts.Type.(*ast.StructType); isStruct && ts.Name.IsExported() && !covered[ts.Name.Name] {
				t.Errorf("payload %s has no golden value: add one to goldenPayloads and run with -update", ts.Name.Name)
			}
		}
	}

	for _, typ := range append(slices.Clone(events.EventTypes), events.ChallengeTypes...) {
		want, ok := golden[string(typ)]
		if !ok {
			t.Errorf("%s has no golden value", typ)
			continue
		}
		b, err := os.ReadFile(filepath.Join("testdata", string(typ)+".json"))
		if err != nil {
			t.Errorf("%s: %v", typ, err)
			continue
		}
		got, err := decodeOf(typ, b)
		if err != nil {
			t.Errorf("DecodeEventOf(%s): %v", typ, err)
			continue
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("DecodeEventOf(%s) = %#v, want %#v", typ, got, want)
		}
	}
	if _, err := events.DecodeEventOf("otp.teleported", []byte(`{}`)); !errors.Is(err, events.ErrUnknownType) {
		t.Errorf("an unknown type decoded: %v", err)
	}
}

// decodeOf decodes a body of the audit stream or of the verifier's stream.
func decodeOf(typ events.Type, b []byte) (any, error) {
	switch typ {
	case events.TypeChallenge:
		var c events.Challenge
		return c, events.DecodeEvent(b, &c)
	case events.TypeChallengeSuperseded:
		var s events.Superseded
		return s, events.DecodeEvent(b, &s)
	}
	return events.DecodeEventOf(typ, b)
}

// TestIssuedOfEarlierReleasesDecodes: an otp.issued an earlier issuer stored, with the
// plaintext recipient, the code HMAC and the session, still decodes into the deprecated
// fields for one release, and is told apart from the new form.
func TestIssuedOfEarlierReleasesDecodes(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "otp.issued.earlier-release.json"))
	if err != nil {
		t.Fatal(err)
	}
	v, err := events.DecodeEventOf(events.TypeIssued, b)
	if err != nil {
		t.Fatal(err)
	}
	e := v.(events.Issued)
	if e.Recipient != "ana@example.com" || !bytes.Equal(e.CodeHMAC, []byte{9, 9}) || e.PepperKeyID != "p1" ||
		e.SessionID != "s-1" || e.ClientIP != "203.0.113.7" || e.MaxAttempts != 5 || !e.Legacy() {
		t.Fatalf("earlier otp.issued decoded as %+v", e)
	}
	g, _ := os.ReadFile(filepath.Join("testdata", "otp.issued.json"))
	v, err = events.DecodeEventOf(events.TypeIssued, g)
	if err != nil || v.(events.Issued).Legacy() {
		t.Fatalf("the new otp.issued reads as legacy: %+v, %v", v, err)
	}
}

// TestIssuedCarriesNoSecretOrPlaintext: the otp.issued the contract writes has no field
// for the code HMAC, the session, the client IP or the address.
func TestIssuedCarriesNoSecretOrPlaintext(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "otp.issued.json"))
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"recipient", "code_hmac", "pepper_key_id", "session_id", "client_ip"} {
		if _, ok := fields[f]; ok {
			t.Errorf("otp.issued writes %s", f)
		}
	}
	if bytes.Contains(b, []byte("example.com")) && !bytes.Contains(b, []byte("a***@example.com")) {
		t.Errorf("otp.issued holds an address: %s", b)
	}
}
