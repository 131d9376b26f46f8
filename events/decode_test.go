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
