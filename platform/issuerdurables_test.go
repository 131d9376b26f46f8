package platform

import "testing"

// TestSubjectMatches: provisioning asks which of the issuer's durables reads a request
// subject by its filter; '*' takes one token, '>' one or more.
func TestSubjectMatches(t *testing.T) {
	for _, c := range []struct {
		filter, subject string
		ok              bool
	}{
		{"otp.requested.*", "otp.requested.acme", true},
		{"otp.requested.acme", "otp.requested.acme", true},
		{"otp.requested.acme", "otp.requested.globex", false},
		{"otp.requested.acme", "otp.requested.acme.x", false},
		{"otp.requested.*", "otp.requested", false},
		{"otp.requested.*", "otp.requested.acme.x", false},
		{"otp.>", "otp.requested.acme", true},
		{"otp.>", "otp", false},
		{"", "otp.requested.acme", true},
	} {
		if got := SubjectMatches(c.filter, c.subject); got != c.ok {
			t.Errorf("%q takes %q: %v, want %v", c.filter, c.subject, got, c.ok)
		}
	}
}
