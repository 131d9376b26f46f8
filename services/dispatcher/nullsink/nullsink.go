// Package nullsink is the "null" provider: it accepts every message at once (or after a
// fixed delay) and, when given an address, hands each one to a collector over TCP as one
// JSON line. It exists for load runs (`otpflow bench`): the pipeline's own throughput,
// with no mail server in the way, and every code back in the bench's hands so it can
// verify them. OTP_ENV=production refuses it (platform.CheckProviders): the codes leave
// the dispatcher in clear text.
package nullsink

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
)

// Handed is one line the provider writes to its collector.
type Handed struct {
	// ID is the mail's idempotency key, "<challenge>:<code_seq>".
	ID string `json:"id"`
	// MessageID is the id the provider answered with.
	MessageID string `json:"message_id"`
	To        string `json:"to"`
	Text      string `json:"text"`
	// At is when the provider accepted the message.
	At time.Time `json:"at"`
}

// Config is the provider's setting.
type Config struct {
	// Addr is the collector's TCP address; empty: messages are dropped once accepted.
	Addr string
	// Delay is how long each send takes, as a slow provider's would; 0: none.
	Delay time.Duration
}

// Provider is the "null" provider.
type Provider struct {
	cfg Config
	seq atomic.Uint64
	// turn is held (one token) by the send that writes to the collector: a lock a send
	// can give up waiting for when its context ends.
	turn chan struct{}
	conn net.Conn
	w    *bufio.Writer
}

// New returns a null provider. It does not dial until the first send.
func New(cfg Config) *Provider {
	p := &Provider{cfg: cfg, turn: make(chan struct{}, 1)}
	p.turn <- struct{}{}
	return p
}

// Name implements mailer.Provider.
func (p *Provider) Name() string { return "null" }

// Send implements mailer.Provider: it waits Delay, then hands the message to the collector.
// A collector that cannot be reached or written to makes the provider down, so the
// dispatcher treats it as it would a mail server that is gone.
func (p *Provider) Send(ctx context.Context, m *mailer.Message) (mailer.Receipt, error) {
	if p.cfg.Delay > 0 {
		t := time.NewTimer(p.cfg.Delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.Transient, Err: ctx.Err()}
		}
	}
	id := "null-" + strconv.FormatUint(p.seq.Add(1), 10)
	if p.cfg.Addr == "" {
		return mailer.Receipt{MessageID: id}, nil
	}
	if err := p.hand(ctx, Handed{ID: m.ID, MessageID: id, To: m.To, Text: m.Text}); err != nil {
		class := mailer.ProviderDown
		if ctx.Err() != nil {
			class = mailer.Transient // out of time, not a broken collector
		}
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: class, Err: err}
	}
	return mailer.Receipt{MessageID: id}, nil
}

// hand writes one line on the collector connection, dialling it first if needed. A
// failed write drops the connection; the next send dials again.
func (p *Provider) hand(ctx context.Context, h Handed) error {
	select {
	case <-p.turn:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { p.turn <- struct{}{} }()
	h.At = time.Now() // the answer: this is when the provider takes the message
	line, err := json.Marshal(h)
	if err != nil {
		return err
	}
	line = append(line, '\n')
	if p.conn == nil {
		var d net.Dialer
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		conn, err := d.DialContext(dctx, "tcp", p.cfg.Addr)
		cancel()
		if err != nil {
			return fmt.Errorf("null sink collector: %w", err)
		}
		p.conn, p.w = conn, bufio.NewWriter(conn)
	}
	deadline := time.Now().Add(5 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = p.conn.SetWriteDeadline(deadline)
	_, err = p.w.Write(line)
	if err == nil {
		err = p.w.Flush()
	}
	if err != nil {
		_ = p.conn.Close()
		p.conn, p.w = nil, nil
		return fmt.Errorf("null sink collector: %w", err)
	}
	return nil
}

// Close closes the collector connection.
func (p *Provider) Close() error {
	<-p.turn
	defer func() { p.turn <- struct{}{} }()
	if p.conn == nil {
		return nil
	}
	err := p.conn.Close()
	p.conn, p.w = nil, nil
	return err
}
