// Package mailer is what the dispatcher needs from a mail provider: one message, one send,
// and an outcome the dispatcher can act on. Providers (smtp, maildir, and SES) implement
// Provider; the dispatcher tries them in order with Chain.
package mailer

import (
	"context"
	"errors"
	"fmt"

	"github.com/otpflow/otpflow/events"
	gomail "github.com/wneessen/go-mail"
)

// Message is one OTP email, rendered and ready to send.
type Message struct {
	From    string
	To      string
	Subject string
	Text    string
	HTML    string
	// Headers are extra headers (e.g. X-Otp-Challenge-Id); names and values are set by
	// the dispatcher, never by request fields.
	Headers map[string]string
	// Tags tie provider feedback (bounces, complaints) back to the challenge.
	Tags map[string]string
	// ID is the idempotency key of this mail: "<challenge>:<code_seq>".
	ID string
}

// Receipt is what a provider answers for an accepted message.
type Receipt struct {
	MessageID string
}

// Provider sends one message. Send must honour ctx and return a *SendError that
// classifies any failure; Guard and Chain turn anything else into one, so the text the
// dispatcher sees never names the recipient.
type Provider interface {
	Name() string
	Send(ctx context.Context, m *Message) (Receipt, error)
}

// Class is what a send failure means for the dispatcher.
type Class string

// Failure classes. Each has one action, listed in docs/delivery.md.
const (
	// Transient: retry later, here or on the next provider.
	Transient Class = "transient"
	// Throttled: the provider asks us to slow down; slow its token bucket and try the
	// next provider.
	Throttled Class = "throttled"
	// QuotaExhausted: the provider's daily or account quota is spent; fail over and keep
	// the provider out of the way for a while.
	QuotaExhausted Class = "quota_exhausted"
	// ProviderDown: the provider is unreachable, paused or misconfigured; fail over at once.
	ProviderDown Class = "provider_down"
	// Permanent: this message will never be accepted (bad recipient, rejected content);
	// do not retry and do not fail over.
	Permanent Class = "permanent"
	// Ambiguous: the message was handed over but no final answer came back; it may have
	// been sent.
	Ambiguous Class = "ambiguous"
)

// SendError is a classified send failure.
//
// Its text is safe to log, store and publish: providers quote the recipient ("550 5.1.1
// <ana@example.com>: Recipient address rejected", go-mail's "affected recipient(s): ...",
// SES's "The following identities failed the check"), and some quote an IP ("Client host
// [203.0.113.7] blocked"), so Error shows Err's text with every address and IP address
// replaced (events.RedactAddresses, events.RedactIPs). Err itself stays as the provider
// gave it, for errors.Is and errors.As; never print it on its own.
type SendError struct {
	Provider string
	Class    Class
	Err      error
}

func (e *SendError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("%s: %s", e.Provider, e.Class)
	}
	return fmt.Sprintf("%s: %s: %s", e.Provider, e.Class, events.RedactIPs(events.RedactAddresses(e.Err.Error())))
}

func (e *SendError) Unwrap() error { return e.Err }

// asSendError returns err as a *SendError: an unclassified error becomes a transient one,
// and an error that wraps a SendError is wrapped once more, since the wrapper's own text
// is not cleared of addresses.
func asSendError(provider string, err error) error {
	var se *SendError
	switch {
	case !errors.As(err, &se):
		return &SendError{Provider: provider, Class: Transient, Err: err}
	case error(se) != err:
		return &SendError{Provider: se.Provider, Class: se.Class, Err: err}
	}
	return err
}

// ClassOf returns the class of err; an unclassified error counts as transient.
func ClassOf(err error) Class {
	var se *SendError
	if errors.As(err, &se) {
		return se.Class
	}
	return Transient
}

// Compose renders m as an RFC 5322 message (text and HTML alternatives) with go-mail,
// which encodes every header value, so no field can inject a header.
func Compose(m *Message) (*gomail.Msg, error) {
	msg := gomail.NewMsg()
	if err := msg.From(m.From); err != nil {
		return nil, fmt.Errorf("from: %w", err)
	}
	if err := msg.To(m.To); err != nil {
		return nil, fmt.Errorf("to: %w", err)
	}
	msg.Subject(m.Subject)
	msg.SetDate()
	msg.SetMessageID()
	msg.SetGenHeader("Auto-Submitted", "auto-generated")
	for k, v := range m.Headers {
		msg.SetGenHeader(gomail.Header(k), v)
	}
	msg.SetBodyString(gomail.TypeTextPlain, m.Text)
	if m.HTML != "" {
		msg.AddAlternativeString(gomail.TypeTextHTML, m.HTML)
	}
	return msg, nil
}
