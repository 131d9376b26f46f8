// Package smtp sends OTP mail through an SMTP relay with wneessen/go-mail.
package smtp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
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
	opts := []gomail.Option{gomail.WithPort(p.cfg.Port), gomail.WithTimeout(p.cfg.Timeout)}
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

// Classify maps an SMTP send error to a failure class.
func Classify(err error) mailer.Class {
	var se *gomail.SendError
	if errors.As(err, &se) {
		code := se.ErrorCode()
		switch {
		case se.Reason == gomail.ErrSMTPDataClose && code == 0:
			// The message went over the wire and the final answer never came.
			return mailer.Ambiguous
		case code == 421 || code == 450 || code == 451 || code == 452:
			return mailer.Transient
		case code == 535 || code == 530 || code == 534:
			return mailer.ProviderDown
		case code >= 500 && (se.Reason == gomail.ErrSMTPRcptTo || se.Reason == gomail.ErrSMTPData || se.Reason == gomail.ErrSMTPDataClose):
			return mailer.Permanent
		case code >= 500:
			return mailer.ProviderDown
		case se.IsTemp() || code >= 400:
			return mailer.Transient
		}
		return mailer.Transient
	}
	var dnsErr *net.DNSError
	var opErr *net.OpError
	switch {
	case errors.As(err, &dnsErr):
		return mailer.ProviderDown
	case errors.As(err, &opErr) && opErr.Op == "dial":
		if opErr.Timeout() {
			return mailer.Transient
		}
		return mailer.ProviderDown
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return mailer.Transient
	}
	return mailer.Transient
}

// String describes the relay without its password.
func (c Config) String() string {
	return fmt.Sprintf("smtp://%s:%d?tls=%s", c.Host, c.Port, c.TLS)
}
