// Package maildir is the "sandbox" provider: it writes each OTP mail as an RFC 5322 file
// into a Maildir (tmp/ then new/), for development and tests.
package maildir

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
)

// Provider writes into one Maildir.
type Provider struct {
	dir  string
	host string
}

// New creates the Maildir at dir if needed.
func New(dir string) (*Provider, error) {
	for _, sub := range []string{"tmp", "new", "cur"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("maildir %s: %w", dir, err)
		}
	}
	host, _ := os.Hostname()
	if host == "" {
		host = "localhost"
	}
	return &Provider{dir: dir, host: host}, nil
}

// Name implements mailer.Provider.
func (p *Provider) Name() string { return "sandbox" }

// Dir is where mail lands.
func (p *Provider) Dir() string { return p.dir }

// Send implements mailer.Provider.
func (p *Provider) Send(_ context.Context, m *mailer.Message) (mailer.Receipt, error) {
	msg, err := mailer.Compose(m)
	if err != nil {
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.Permanent, Err: err}
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	name := fmt.Sprintf("%d.%s.%s", time.Now().UnixNano(), hex.EncodeToString(b), p.host)
	tmp := filepath.Join(p.dir, "tmp", name)
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.ProviderDown, Err: err}
	}
	_, werr := msg.WriteTo(f)
	if err := f.Sync(); werr == nil {
		werr = err
	}
	if err := f.Close(); werr == nil {
		werr = err
	}
	if werr == nil {
		werr = os.Rename(tmp, filepath.Join(p.dir, "new", name))
	}
	if werr != nil {
		_ = os.Remove(tmp)
		return mailer.Receipt{}, &mailer.SendError{Provider: p.Name(), Class: mailer.Transient, Err: werr}
	}
	return mailer.Receipt{MessageID: name}, nil
}
