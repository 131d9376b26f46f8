package platform

import (
	"testing"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

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

// TestStartedAt: only a durable of the issuer on OTP_REQUESTS that provisioning made at a
// sequence, and marked so, binds in place of the contract's start; one made at a
// sequence by hand, another consumer, or another stream does not.
func TestStartedAt(t *testing.T) {
	contract := events.IssuerTenantConsumer("acme")
	made := contract
	made.DeliverPolicy, made.OptStartSeq = jetstream.DeliverByStartSequencePolicy, 42
	marked := made
	marked.Metadata = map[string]string{MetadataStartSeq: "42"}
	for _, c := range []struct {
		name   string
		stream string
		have   jetstream.ConsumerConfig
		want   jetstream.ConsumerConfig
		accept bool
	}{
		{"made by provisioning", events.StreamRequests, marked, contract, true},
		{"made by hand", events.StreamRequests, made, contract, false},
		{"another stream", events.StreamEvents, marked, contract, false},
		{"another consumer", events.StreamRequests, marked, events.AuditorConsumer, false},
	} {
		got := startedAt(c.stream, c.have, c.want)
		if accepted := got.OptStartSeq == 42; accepted != c.accept {
			t.Errorf("%s: start taken %v, want %v", c.name, accepted, c.accept)
		}
	}
}
