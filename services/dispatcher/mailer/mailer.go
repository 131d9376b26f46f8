// Package mailer is what the dispatcher needs from a mail provider: one message, one send,
// and an outcome the dispatcher can act on. Providers (smtp, maildir, and SES) implement
// Provider; the dispatcher tries them in order with Chain.
package mailer

import (
	"context"
	"errors"
	"fmt"

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

// Provider sends one message. Send must honour ctx and return a *SendError (or an error
// wrapping one) that classifies any failure.
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
type SendError struct {
	Provider string
	Class    Class
	Err      error
}

func (e *SendError) Error() string {
	return fmt.Sprintf("%s: %s: %v", e.Provider, e.Class, e.Err)
}

func (e *SendError) Unwrap() error { return e.Err }

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
