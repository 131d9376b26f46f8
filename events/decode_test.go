package events_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/otpflow/otpflow/events"
)

func TestDecodeRequested(t *testing.T) {
	valid := `{"request_id":"signup-7f3a","recipient":"ana@example.com","purpose":"login","locale":"en","ttl_seconds":300,"context":{"ip":"203.0.113.7","user_agent":"UA","session_id":"s-1"},"metadata":{"app":"web"}}`
	tests := []struct {
		name   string
		body   string
		reason events.RejectReason
		field  string
	}{
		{"valid", valid, "", ""},
		{"minimal", `{"request_id":"r","recipient":"a@b.co","purpose":"login"}`, "", ""},
		{"malformed", `{"request_id":`, events.ReasonMalformedJSON, ""},
		{"not an object", `[1,2]`, events.ReasonMalformedJSON, ""},
		{"trailing data", `{"request_id":"r","recipient":"a@b.co","purpose":"login"} {}`, events.ReasonMalformedJSON, ""},
		{"too large", `{"request_id":"r","recipient":"a@b.co","purpose":"login","metadata":{"x":"` + strings.Repeat("a", 9000) + `"}}`, events.ReasonTooLarge, ""},
		{"unknown field", `{"request_id":"r","recipient":"a@b.co","purpose":"login","admin":true}`, events.ReasonUnknownField, "admin"},
		{"unknown field named by an address", `{"request_id":"r","recipient":"a@b.co","purpose":"login","zoe@example.com":true}`, events.ReasonUnknownField, "(redacted)"},
		{"unknown field named by an IP", `{"request_id":"r","recipient":"a@b.co","purpose":"login","203.0.113.7":1}`, events.ReasonUnknownField, "(redacted)"},
		{"missing request_id", `{"recipient":"a@b.co","purpose":"login"}`, events.ReasonMissingField, "request_id"},
		{"missing recipient", `{"request_id":"r","purpose":"login"}`, events.ReasonMissingField, "recipient"},
		{"missing purpose", `{"request_id":"r","recipient":"a@b.co"}`, events.ReasonMissingField, "purpose"},
		{"CRLF in recipient", `{"request_id":"r","recipient":"a@b.co\r\nBcc: evil@x.co","purpose":"login"}`, events.ReasonHeaderInjection, "recipient"},
		{"LF in locale", `{"request_id":"r","recipient":"a@b.co","purpose":"login","locale":"en\n"}`, events.ReasonHeaderInjection, "locale"},
		{"CR in metadata", `{"request_id":"r","recipient":"a@b.co","purpose":"login","metadata":{"k":"v\r"}}`, events.ReasonHeaderInjection, "metadata"},
		{"invalid address", `{"request_id":"r","recipient":"not-an-address","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"display name", `{"request_id":"r","recipient":"Ana <ana@example.com>","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"two addresses", `{"request_id":"r","recipient":"a@b.co, c@d.co","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"undotted domain", `{"request_id":"r","recipient":"a@localhost","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"bad domain label", `{"request_id":"r","recipient":"a@-b.co","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"no-break space in the local part", `{"request_id":"r","recipient":"a\u00a0b@b.co","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"line separator in the local part", `{"request_id":"r","recipient":"a\u2028b@b.co","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"NEL in the local part", `{"request_id":"r","recipient":"a\u0085b@b.co","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"zero-width space in the local part", `{"request_id":"r","recipient":"a\u200bb@b.co","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"ideographic space in the local part", `{"request_id":"r","recipient":"a\u3000b@b.co","purpose":"login"}`, events.ReasonInvalidRecipient, "recipient"},
		{"unicode letters are fine", `{"request_id":"r","recipient":"jürgen@b.co","purpose":"login"}`, "", ""},
		{"request_id with space", `{"request_id":"a b","recipient":"a@b.co","purpose":"login"}`, events.ReasonInvalidField, "request_id"},
		{"purpose upper case", `{"request_id":"r","recipient":"a@b.co","purpose":"LOGIN"}`, events.ReasonInvalidField, "purpose"},
		{"ttl too short", `{"request_id":"r","recipient":"a@b.co","purpose":"login","ttl_seconds":5}`, events.ReasonInvalidField, "ttl_seconds"},
		{"ttl too long", `{"request_id":"r","recipient":"a@b.co","purpose":"login","ttl_seconds":7200}`, events.ReasonInvalidField, "ttl_seconds"},
		{"ttl wrong type", `{"request_id":"r","recipient":"a@b.co","purpose":"login","ttl_seconds":"300"}`, events.ReasonInvalidField, "ttl_seconds"},
		{"bad ip", `{"request_id":"r","recipient":"a@b.co","purpose":"login","context":{"ip":"999.1.1.1"}}`, events.ReasonInvalidField, "context.ip"},
		{"bad locale", `{"request_id":"r","recipient":"a@b.co","purpose":"login","locale":"english!"}`, events.ReasonInvalidField, "locale"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := events.DecodeRequested([]byte(tt.body))
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			var ve *events.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("err = %v, want a *ValidationError", err)
			}
			if ve.Reason != tt.reason || (tt.field != "" && ve.Field != tt.field) {
				t.Fatalf("got %s/%s, want %s/%s", ve.Reason, ve.Field, tt.reason, tt.field)
			}
			if !errors.Is(err, &events.ValidationError{Reason: tt.reason}) {
				t.Fatal("errors.Is does not match the reason")
			}
			if strings.Contains(ve.Detail, "evil") || strings.ContainsAny(ve.Error(), "\r\n") {
				t.Fatalf("the error quotes the offending value: %q", ve.Error())
			}
		})
	}
}

func TestDecodeVerifyRequest(t *testing.T) {
	if r, err := events.DecodeVerifyRequest([]byte(`{"request_id":"r1","code":"123456","context":{"session_id":"s"}}`)); err != nil || r.Code != "123456" {
		t.Fatalf("valid request: %+v, %v", r, err)
	}
	for name, body := range map[string]string{
		"malformed":  `{`,
		"no code":    `{"request_id":"r1"}`,
		"no id":      `{"code":"1"}`,
		"unknown":    `{"request_id":"r1","code":"1","x":1}`,
		"long code":  `{"request_id":"r1","code":"12345678901234567"}`,
		"too large":  `{"request_id":"r1","code":"1","context":{"session_id":"` + strings.Repeat("s", 2000) + `"}}`,
		"code CRLF":  `{"request_id":"r1","code":"1\r\n"}`,
		"wrong type": `{"request_id":"r1","code":123456}`,
	} {
		if _, err := events.DecodeVerifyRequest([]byte(body)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestSplitSubject(t *testing.T) {
	typ, tenant, err := events.SplitSubject("otp.issued.acme")
	if err != nil || typ != events.TypeIssued || tenant != "acme" {
		t.Fatalf("got %q %q %v", typ, tenant, err)
	}
	for _, s := range []string{"otp", "otp.requested.bad!", "otp.requested." + strings.Repeat("a", 65)} {
		if _, _, err := events.SplitSubject(s); !errors.Is(err, &events.ValidationError{Reason: events.ReasonInvalidTenant}) {
			t.Errorf("%q: err = %v", s, err)
		}
	}
}

// FuzzDecodeRequested: any input gives a request that passes validation or a
// *ValidationError, never a panic; an accepted request has no CR or LF anywhere.
func FuzzDecodeRequested(f *testing.F) {
	f.Add([]byte(`{"request_id":"signup-7f3a","recipient":"ana@example.com","purpose":"login","locale":"en","ttl_seconds":300,"context":{"ip":"203.0.113.7"},"metadata":{"app":"web"}}`))
	f.Add([]byte(`{"request_id":"r","recipient":"a@b.co\r\nBcc: x@y.co","purpose":"login"}`))
	f.Add([]byte(`{"request_id":"r","recipient":"\"q\"@b.co","purpose":"login"}`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := events.DecodeRequested(data)
		if err != nil {
			var ve *events.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("untyped error %T: %v", err, err)
			}
			return
		}
		if err := r.Validate(); err != nil {
			t.Fatalf("accepted request fails validation: %v", err)
		}
		for _, s := range []string{r.RequestID, r.Recipient, r.Purpose, r.Locale, r.Context.SessionID, r.Context.UserAgent} {
			if strings.ContainsAny(s, "\r\n") {
				t.Fatalf("accepted CR/LF in %q", s)
			}
		}
	})
}

// FuzzDecodeVerifyRequest: any input decodes or fails with a *ValidationError.
func FuzzDecodeVerifyRequest(f *testing.F) {
	f.Add([]byte(`{"request_id":"r1","code":"123456","context":{"session_id":"s"}}`))
	f.Add([]byte(`{"request_id":"r1","code":123}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := events.DecodeVerifyRequest(data)
		if err != nil {
			var ve *events.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("untyped error %T: %v", err, err)
			}
			return
		}
		if r.RequestID == "" || r.Code == "" || len(r.Code) > 16 {
			t.Fatalf("accepted invalid request %+v", r)
		}
	})
}

// FuzzDecodeStatusRequest: any input decodes or fails with a *ValidationError.
func FuzzDecodeStatusRequest(f *testing.F) {
	f.Add([]byte(`{"request_id":"r1"}`))
	f.Add([]byte(`{"request_id":"r 1"}`))
	f.Add([]byte(`{"request_id":"r1","code":"1"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := events.DecodeStatusRequest(data)
		if err != nil {
			var ve *events.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("untyped error %T: %v", err, err)
			}
			return
		}
		if r.RequestID == "" || len(r.RequestID) > 128 || strings.ContainsAny(r.RequestID, " \r\n\x00") {
			t.Fatalf("accepted invalid request %+v", r)
		}
	})
}

// TestCanonicalAddress: one form for every key, hash and comparison, so that changing
// the case of an address or padding it never makes a second person.
func TestCanonicalAddress(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"ana@example.com", "ana@example.com"},
		{"Ana@Example.COM", "ana@example.com"},
		{" ANA@EXAMPLE.COM ", "ana@example.com"},
		{"Ünal@example.com", "Ünal@example.com"},         // only ASCII folds
		{"\u212Aim@example.com", "\u212Aim@example.com"}, // KELVIN SIGN is not "k"
		{"\u212Bsa@Example.com", "\u212Bsa@example.com"}, // nor ANGSTROM SIGN "å"
	} {
		if got := events.CanonicalAddress(tt.in); got != tt.want {
			t.Errorf("CanonicalAddress(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestDecodeSealedDispatch(t *testing.T) {
	tests := []struct {
		name, body string
		reason     events.RejectReason
		field      string
	}{
		{"sealed", `{"format":"otpflow.dispatch.sealed.v2","tenant":"acme","seal_key_id":"s1","sealed":"AQID"}`, "", ""},
		{"the unsealed format", `{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","tenant":"acme","recipient":"a@b.co","seal_key_id":"s1","sealed_code":"AQID"}`, events.ReasonUnknownField, ""},
		{"no format", `{"tenant":"acme","seal_key_id":"s1","sealed":"AQID"}`, events.ReasonInvalidField, "format"},
		{"a field beside the seal", `{"format":"otpflow.dispatch.sealed.v2","tenant":"acme","seal_key_id":"s1","sealed":"AQID","recipient":"a@b.co"}`, events.ReasonUnknownField, "recipient"},
		{"bad tenant", `{"format":"otpflow.dispatch.sealed.v2","tenant":"a.b","seal_key_id":"s1","sealed":"AQID"}`, events.ReasonInvalidTenant, "tenant"},
		{"empty seal", `{"format":"otpflow.dispatch.sealed.v2","tenant":"acme","seal_key_id":"s1","sealed":""}`, events.ReasonMissingField, "sealed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := events.DecodeSealedDispatch([]byte(tt.body))
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			var ve *events.ValidationError
			if !errors.As(err, &ve) || ve.Reason != tt.reason || (tt.field != "" && ve.Field != tt.field) {
				t.Fatalf("err = %v, want %s/%s", err, tt.reason, tt.field)
			}
		})
	}
}

func TestDecodeVerifyRequestContext(t *testing.T) {
	if r, err := events.DecodeVerifyRequest([]byte(`{"request_id":"r","code":"1","context":{"ip":"2001:db8::1","user_agent":"UA"}}`)); err != nil || r.Context.IP != "2001:db8::1" {
		t.Fatalf("%+v %v", r, err)
	}
	for body, field := range map[string]string{
		`{"request_id":"r","code":"1","context":{"ip":"not-an-ip"}}`:    "context.ip",
		`{"request_id":"r","code":"1","context":{"user_agent":"a\nb"}}`: "context.user_agent",
	} {
		var ve *events.ValidationError
		if _, err := events.DecodeVerifyRequest([]byte(body)); !errors.As(err, &ve) || ve.Field != field {
			t.Errorf("%s: err = %v, want a refusal of %s", body, err, field)
		}
	}
}

// FuzzDecodeDispatch: any dispatch body, outside or inside the seal, decodes or fails with
// a *ValidationError, and what decodes holds no CR or LF in a header-bound field.
func FuzzDecodeDispatch(f *testing.F) {
	f.Add([]byte(`{"format":"otpflow.dispatch.sealed.v2","tenant":"acme","seal_key_id":"s1","sealed":"AQID"}`))
	f.Add([]byte(`{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","tenant":"acme","request_id":"r","code_seq":1,"recipient":"a@b.co",` +
		`"purpose":"login","issued_at":"2026-11-30T10:00:00Z","expires_at":"2026-11-30T10:05:00Z","code":"123456"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, err := range []error{
			func() error { _, err := events.DecodeSealedDispatch(data); return err }(),
			func() error {
				j, err := events.DecodeDispatchJob(data)
				if err == nil && strings.ContainsAny(j.Recipient+j.Purpose+j.Locale+j.RequestID+j.Code, "\r\n") {
					t.Fatalf("accepted CR/LF in %+v", j)
				}
				return err
			}(),
		} {
			var ve *events.ValidationError
			if err != nil && !errors.As(err, &ve) {
				t.Fatalf("untyped error %T: %v", err, err)
			}
		}
	})
}

// TestClientNetwork: every spelling of one client, and every address of one IPv6 /64, is
// one key of the per-IP limits.
func TestClientNetwork(t *testing.T) {
	for _, tc := range []struct{ ip, want string }{
		{"203.0.113.7", "203.0.113.7"},
		{"::ffff:203.0.113.7", "203.0.113.7"},
		{"2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"},
		{"2001:DB8:1:2::", "2001:db8:1:2::/64"},
		{"2001:db8:0:0::1", "2001:db8::/64"},
	} {
		if got := events.ClientNetwork(tc.ip); got != tc.want {
			t.Errorf("ClientNetwork(%q) = %q, want %q", tc.ip, got, tc.want)
		}
	}
}
