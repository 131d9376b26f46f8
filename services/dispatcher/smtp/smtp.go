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
	"sync/atomic"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	gomail "github.com/wneessen/go-mail"
	gosmtp "github.com/wneessen/go-mail/smtp"
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
	// Pool is how many idle connections the provider keeps open to the relay for the next
	// sends (the URL's pool parameter, default DefaultPool; 0: a connection per message).
	Pool int
}

// Connection reuse. A connection is reused for at most MaxPerConn messages and only if it
// was idle for less than MaxIdle: relays close idle connections (RFC 5321 asks them to
// wait 5 minutes; many wait less) and some cap the messages per connection.
const (
	DefaultPool = 16
	MaxPerConn  = 100
	MaxIdle     = 30 * time.Second
)

// ParseURL parses smtp://[user:pass@]host:port[?tls=starttls|implicit|none][&pool=N]. Errors
// never quote the password.
func ParseURL(raw string) (Config, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "smtp" || u.Hostname() == "" {
		return Config{}, errors.New("must look like smtp://[user:pass@]host:port[?tls=starttls|implicit|none][&pool=N]")
	}
	c := Config{Host: u.Hostname(), TLS: TLSStartTLS, Timeout: 10 * time.Second, Pool: DefaultPool}
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
	if q := u.Query(); q.Has("pool") {
		if c.Pool, err = strconv.Atoi(q.Get("pool")); err != nil || c.Pool < 0 || c.Pool > 1000 {
			return Config{}, errors.New("pool must be a number of connections from 0 to 1000")
		}
	}
	if u.User != nil {
		c.Username = u.User.Username()
		c.Password, _ = u.User.Password()
	}
	return c, nil
}

// Provider is the "smtp" provider. It keeps up to Config.Pool connections to the relay
// open between sends, so a send costs one SMTP transaction (MAIL, RCPT, DATA) instead of
// a TCP connect, the greeting, EHLO, STARTTLS and AUTH besides.
type Provider struct {
	cfg  Config
	idle chan *conn
}

// conn is one open connection to the relay.
type conn struct {
	smtp *gosmtp.Client
	// capped is the TCP connection under it, whose deadlines never pass the current
	// send's (nil with tls=implicit, dialled by go-mail's own TLS dialer).
	capped *cappedConn
	sent   int
	since  time.Time // idle since
}

// New returns an SMTP provider.
func New(cfg Config) *Provider {
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	return &Provider{cfg: cfg, idle: make(chan *conn, cfg.Pool)}
}

// Name implements mailer.Provider.
func (p *Provider) Name() string { return "smtp" }

// Send implements mailer.Provider, over an idle connection when there is one. A reused
// connection the relay has closed meanwhile fails before the message is handed over (no
// answer to the NOOP that checks it, or none, or 421, at MAIL FROM): the message is then
// sent once more, on a new connection, as the relay never saw it. Nothing that reached
// DATA is sent again here.
func (p *Provider) Send(ctx context.Context, m *mailer.Message) (mailer.Receipt, error) {
	msg, err := mailer.Compose(m)
	if err != nil {
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.Permanent, Err: err}
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	fresh := false // the retry must dial
	for {
		// go-mail does not watch ctx once connected: it sets the connection's deadline
		// to its timeout at the dial and again before the message. Half the time left to
		// ctx's deadline for each keeps the whole exchange inside it, so a slow relay is
		// never handed a mail after the caller's deadline (for a code, its expiry).
		timeout := p.cfg.Timeout
		if d, ok := ctx.Deadline(); ok {
			timeout = min(timeout, time.Until(d)/2)
		}
		if timeout <= 0 {
			return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.Transient, Err: context.DeadlineExceeded}
		}
		// No socket operation of this send may pass its deadline, whatever go-mail sets
		// between the phases of the exchange (it sets a fresh timeout at the connect,
		// after the greeting and before the message).
		hard, _ := ctx.Deadline()
		var c *conn
		reused := false
		if !fresh {
			c, reused = p.take()
		}
		if c == nil {
			if c, err = p.dial(ctx, timeout, hard); err != nil {
				return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: Classify(err), Err: err}
			}
		} else if c.capped != nil {
			c.capped.limit(hard)
		}
		// The deadline of this send, not of the one before on this connection: set it
		// now, and go-mail sets it again from the client that sends. No NOOP before the
		// message: a connection the relay dropped fails at MAIL FROM, before anything is
		// handed over, and is retried below.
		if err = c.smtp.UpdateDeadline(timeout); err == nil {
			var sender *gomail.Client
			if sender, err = gomail.NewClient(p.cfg.Host, append(p.options(timeout), gomail.WithoutNoop())...); err == nil {
				err = sender.SendWithSMTPClient(c.smtp, msg)
			}
		}
		switch {
		case err == nil:
			c.sent++
			p.put(c)
			return mailer.Receipt{MessageID: msg.GetMessageID()}, nil
		case msg.IsDelivered():
			// The relay answered 250 to the final dot and then failed the RSET that
			// follows (a relay that hangs up after its last message): sent.
			_ = c.smtp.Close()
			return mailer.Receipt{MessageID: msg.GetMessageID()}, nil
		}
		// After a failure the connection's state is unknown: it is not reused.
		_ = c.smtp.Close()
		if reused && !fresh && neverHandedOver(err) && ctx.Err() == nil {
			fresh = true
			continue
		}
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: Classify(err), Err: err}
	}
}

// neverHandedOver reports whether err ended a send on a reused connection before the relay
// could have taken the message: the connection failed its check, or MAIL FROM got no
// reply or 421 (the relay closing the connection).
func neverHandedOver(err error) bool {
	var se *gomail.SendError
	if !errors.As(err, &se) {
		return false
	}
	code := se.ErrorCode()
	return se.Reason == gomail.ErrConnCheck && code == 0 || se.Reason == gomail.ErrSMTPMailFrom && (code == 0 || code == 421)
}

// take returns an idle connection fit for one more message, or nil; it drops the ones
// that are not (without QUIT: one the relay or a NAT forgot would hold the send up).
func (p *Provider) take() (*conn, bool) {
	for {
		select {
		case c := <-p.idle:
			if c.sent >= MaxPerConn || time.Since(c.since) > MaxIdle {
				_ = c.smtp.Close()
				continue
			}
			return c, true
		default:
			return nil, false
		}
	}
}

// put keeps c for a later send, or ends it (QUIT, in the background) when it has served
// its messages or the pool is full.
func (p *Provider) put(c *conn) {
	if c.sent < MaxPerConn {
		c.since = time.Now()
		select {
		case p.idle <- c:
			return
		default:
		}
	}
	go p.quit(c)
}

// quit ends c with QUIT, waiting at most a second for the relay's answer.
func (p *Provider) quit(c *conn) {
	if c.capped != nil {
		c.capped.limit(time.Time{}) // the last send's deadline no longer applies
	}
	_ = c.smtp.UpdateDeadline(time.Second)
	_ = c.smtp.Quit()
	_ = c.smtp.Close()
}

// options are go-mail's options for the relay, with timeout as the connection deadline.
func (p *Provider) options(timeout time.Duration) []gomail.Option {
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
	return opts
}

// dial opens a connection: TCP (or TLS), EHLO, STARTTLS and AUTH as configured, none of
// it past hard (when set). A handshake that fails closes the connection.
func (p *Provider) dial(ctx context.Context, timeout time.Duration, hard time.Time) (*conn, error) {
	opts := p.options(timeout)
	var capped *cappedConn
	if p.cfg.TLS != TLSImplicit {
		// go-mail's own TLS dialer does implicit TLS; plain and STARTTLS connections go
		// through a dialler whose connection caps every deadline (STARTTLS wraps it).
		opts = append(opts, gomail.WithDialContextFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			raw, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			capped = &cappedConn{Conn: raw}
			capped.limit(hard)
			return capped, nil
		}))
	}
	mc, err := gomail.NewClient(p.cfg.Host, opts...)
	if err != nil {
		return nil, err
	}
	sc, err := mc.DialToSMTPClientWithContext(ctx)
	if err != nil {
		if capped != nil {
			_ = capped.Close()
		}
		return nil, fmt.Errorf("dial failed: %w", err) // as go-mail's DialAndSend words it: Classify reads the text
	}
	return &conn{smtp: sc, capped: capped}, nil
}

// cappedConn is a connection whose read and write deadlines never pass a limit: the
// deadline of the send that uses it.
type cappedConn struct {
	net.Conn
	max atomic.Int64 // unix nanoseconds; 0: no limit
}

// limit sets the latest deadline the connection accepts (zero: none) and applies it.
func (c *cappedConn) limit(t time.Time) {
	if t.IsZero() {
		c.max.Store(0)
		return
	}
	c.max.Store(t.UnixNano())
	_ = c.Conn.SetDeadline(t)
}

func (c *cappedConn) capped(t time.Time) time.Time {
	if m := c.max.Load(); m != 0 && (t.IsZero() || t.UnixNano() > m) {
		return time.Unix(0, m)
	}
	return t
}

func (c *cappedConn) SetDeadline(t time.Time) error      { return c.Conn.SetDeadline(c.capped(t)) }
func (c *cappedConn) SetReadDeadline(t time.Time) error  { return c.Conn.SetReadDeadline(c.capped(t)) }
func (c *cappedConn) SetWriteDeadline(t time.Time) error { return c.Conn.SetWriteDeadline(c.capped(t)) }

// Close ends the idle connections.
func (p *Provider) Close() error {
	for {
		select {
		case c := <-p.idle:
			p.quit(c)
		default:
			return nil
		}
	}
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
	return fmt.Sprintf("smtp://%s:%d?tls=%s&pool=%d", c.Host, c.Port, c.TLS, c.Pool)
}
