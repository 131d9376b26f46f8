// Package smtp sends OTP mail through an SMTP relay with wneessen/go-mail.
package smtp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	gomail "github.com/wneessen/go-mail"
)

// TLS modes of OTP_SMTP_URL.
const (
	TLSStartTLS = "starttls" // plain connect, STARTTLS required (the default)
	TLSImplicit = "implicit" // TLS from the first byte (port 465)
	TLSNone     = "none"     // no TLS: only for a local sink
)

// Config is a parsed OTP_SMTP_URL.
type Config struct {
	Host     string
	Port     int
	TLS      string
	Username string
	Password string
	// Timeout bounds one whole send; default 10s.
	Timeout time.Duration
}

// ParseURL parses smtp://[user:pass@]host:port[?tls=starttls|implicit|none]. Errors never
// quote the password.
func ParseURL(raw string) (Config, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "smtp" || u.Hostname() == "" {
		return Config{}, errors.New("must look like smtp://[user:pass@]host:port[?tls=starttls|implicit|none]")
	}
	c := Config{Host: u.Hostname(), TLS: TLSStartTLS, Timeout: 10 * time.Second}
	if t := u.Query().Get("tls"); t != "" {
		c.TLS = t
	}
	switch c.TLS {
	case TLSStartTLS, TLSNone:
		c.Port = 587
	case TLSImplicit:
		c.Port = 465
	default:
		return Config{}, errors.New("tls must be starttls, implicit or none")
	}
	if p := u.Port(); p != "" {
		if c.Port, err = strconv.Atoi(p); err != nil || c.Port < 1 || c.Port > 65535 {
			return Config{}, errors.New("port must be 1-65535")
		}
	}
	if u.User != nil {
		c.Username = u.User.Username()
		c.Password, _ = u.User.Password()
	}
	return c, nil
}

// Provider is the "smtp" provider.
type Provider struct {
	cfg Config
}

// New returns an SMTP provider.
func New(cfg Config) *Provider {
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	return &Provider{cfg: cfg}
}

// Name implements mailer.Provider.
func (p *Provider) Name() string { return "smtp" }

// Send implements mailer.Provider: one connection per message.
func (p *Provider) Send(ctx context.Context, m *mailer.Message) (mailer.Receipt, error) {
	msg, err := mailer.Compose(m)
	if err != nil {
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.Permanent, Err: err}
	}
	// go-mail does not watch ctx once connected: it sets the connection's deadline to
	// its timeout at the dial and again before the message. Half the time left to ctx's
	// deadline for each keeps the whole exchange inside it, so a slow relay is never
	// handed a mail after the caller's deadline (for a code, its expiry).
	timeout := p.cfg.Timeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d)/2)
	}
	if timeout <= 0 {
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.Transient, Err: context.DeadlineExceeded}
	}
	opts := []gomail.Option{gomail.WithPort(p.cfg.Port), gomail.WithTimeout(timeout)}
	switch p.cfg.TLS {
	case TLSStartTLS:
		opts = append(opts, gomail.WithTLSPolicy(gomail.TLSMandatory))
	case TLSImplicit:
		opts = append(opts, gomail.WithSSL())
	case TLSNone:
		opts = append(opts, gomail.WithTLSPolicy(gomail.NoTLS))
	}
	if p.cfg.Username != "" {
		opts = append(opts, gomail.WithSMTPAuth(gomail.SMTPAuthAutoDiscover),
			gomail.WithUsername(p.cfg.Username), gomail.WithPassword(p.cfg.Password))
	}
	client, err := gomail.NewClient(p.cfg.Host, opts...)
	if err != nil {
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.ProviderDown, Err: err}
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	if err := client.DialAndSendWithContext(ctx, msg); err != nil {
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: Classify(err), Err: err}
	}
	return mailer.Receipt{MessageID: msg.GetMessageID()}, nil
}

// Classify maps an SMTP send error to a failure class (RFC 5321 reply codes; SES's SMTP
// interface says "454 Throttling failure: Maximum sending rate exceeded" and "454 Daily
// message quota exceeded").
func Classify(err error) mailer.Class {
	var se *gomail.SendError
	if errors.As(err, &se) {
		code := se.ErrorCode()
		text := strings.ToLower(se.Error())
		switch {
		case se.Reason == gomail.ErrSMTPDataClose && code == 0:
			// The message went over the wire and the final answer never came.
			return mailer.Ambiguous
		case code == 0:
			return classifyNet(err)
		case strings.Contains(text, "daily") && strings.Contains(text, "quota"):
			return mailer.QuotaExhausted
		case code == 454 || (code == 421 || code == 450 || code == 451) && (strings.Contains(text, "rate") || strings.Contains(text, "too many")):
			return mailer.Throttled
		case code >= 400 && code < 500:
			return mailer.Transient
		case code == 530 || code == 534 || code == 535 || code == 538:
			return mailer.ProviderDown // authentication: our configuration
		case se.Reason == gomail.ErrSMTPMailFrom:
			return mailer.ProviderDown // the relay refuses our sender
		case se.Reason == gomail.ErrSMTPRcptTo || se.Reason == gomail.ErrSMTPData || se.Reason == gomail.ErrSMTPDataClose:
			return mailer.Permanent // this recipient or this content
		}
		return mailer.ProviderDown
	}
	return classifyNet(err)
}

// classifyNet classifies an error without an SMTP reply: nothing was handed over.
func classifyNet(err error) mailer.Class {
	var dnsErr *net.DNSError
	var opErr *net.OpError
	text := strings.ToLower(err.Error())
	switch {
	case errors.As(err, &dnsErr):
		return mailer.ProviderDown
	case errors.As(err, &opErr) && opErr.Op == "dial" && !opErr.Timeout():
		return mailer.ProviderDown // refused, unreachable
	case strings.Contains(text, "auth") && (strings.Contains(text, "535") || strings.Contains(text, "failed")):
		return mailer.ProviderDown
	case strings.Contains(text, "starttls") || strings.Contains(text, "tls"):
		return mailer.ProviderDown // the relay cannot give the TLS we require
	}
	var reply *textproto.Error
	if errors.As(err, &reply) {
		switch {
		case reply.Code >= 500:
			return mailer.ProviderDown
		case reply.Code == 421 && (strings.Contains(text, "rate") || strings.Contains(text, "too many")):
			return mailer.Throttled
		}
	}
	return mailer.Transient
}

// String describes the relay without its password.
func (c Config) String() string {
	return fmt.Sprintf("smtp://%s:%d?tls=%s", c.Host, c.Port, c.TLS)
}
