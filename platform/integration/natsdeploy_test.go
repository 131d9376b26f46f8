package platform_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// identityConn is a connection as one identity that keeps every asynchronous error the
// server sent it, so a test can tell which publish or subscription was refused.
type identityConn struct {
	id string
	nc *nats.Conn
	js jetstream.JetStream

	mu   sync.Mutex
	errs []error
}

// connectAs connects as identity id over TLS with its nkey seed file, through
// platform.NATSCredentials as the services and the CLI do.
func connectAs(t *testing.T, d *testenv.NATSDeployment, id string) *identityConn {
	t.Helper()
	c := &identityConn{id: id}
	inbox := "_INBOX"
	for _, i := range testenv.DeployIdentities {
		if i.ID == id {
			inbox = i.Inbox
		}
	}
	opts := append([]nats.Option{nats.Name("test-" + id), nats.CustomInboxPrefix(inbox), nats.PermissionErrOnSubscribe(true),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			c.mu.Lock()
			c.errs = append(c.errs, err)
			c.mu.Unlock()
		})}, platform.NATSCredentials(d.Common(id))...)
	nc, err := nats.Connect(d.URL, opts...)
	testenv.Must(t, err, "connect as %s", id)
	t.Cleanup(nc.Close)
	if _, state := platform.NATSPeer(nc); state == nil {
		t.Fatalf("%s: the connection is not TLS", id)
	}
	c.nc = nc
	c.js, err = platform.NewJetStream(nc, testenv.DeployJSAPIPrefix)
	testenv.Must(t, err, "jetstream")
	return c
}

// violation waits for the server's permissions violation on subject (the text after
// "Permissions Violation for ", e.g. `Publish to "otp.issued.acme"`).
func (c *identityConn) violation(what string) error {
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		for _, err := range c.errs {
			if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), "Permissions Violation for "+what) {
				c.mu.Unlock()
				return nil
			}
		}
		c.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s: no permissions violation for %s; errors seen: %v", c.id, what, c.seen())
}

// noViolation fails when the server refused anything naming subject.
func (c *identityConn) noViolation(subject string) error {
	if err := c.nc.Flush(); err != nil {
		return err
	}
	time.Sleep(100 * time.Millisecond) // the error callback runs on its own goroutine
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, err := range c.errs {
		if strings.Contains(err.Error(), `"`+subject+`"`) {
			return fmt.Errorf("%s: %w", c.id, err)
		}
	}
	return nil
}

func (c *identityConn) seen() []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]error(nil), c.errs...)
}

// provisionAsAdmin creates the contract's streams and every durable consumer as the
// provisioning admin, as otpflow provision does.
func provisionAsAdmin(t *testing.T, d *testenv.NATSDeployment) {
	t.Helper()
	admin := connectAs(t, d, "admin")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The tenants of the template each with a request stream of their own, as
	// deploy/k8s provisions them (OTP_TENANT_STREAMS).
	_, err := platform.Provision(ctx, admin.js, events.StreamOptions{Tenants: []string{"acme", "globex"}})
	testenv.Must(t, err, "provision")
}
