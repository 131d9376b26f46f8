// Package testenv gives tests real neighbours: an embedded NATS server with JetStream, a
// fresh PostgreSQL database, and an SMTP server that keeps what it receives.
package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats-server/v2/server"
)

// NATS starts an embedded NATS server with JetStream on a free loopback port, stored in a
// temporary directory, and shuts it down at cleanup.
func NATS(tb testing.TB) *server.Server {
	tb.Helper()
	return NATSAt(tb, tb.TempDir(), -1)
}

// NATSAt starts an embedded server storing in dir on port (-1: a free one). Starting a new
// server on the same dir and port after Shutdown restarts the broker with its streams.
func NATSAt(tb testing.TB, dir string, port int) *server.Server {
	tb.Helper()
	opts := &server.Options{
		Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: dir,
		NoLog: true, NoSigs: true, JetStreamMaxMemory: 64 << 20, JetStreamMaxStore: 1 << 30,
	}
	s, err := server.NewServer(opts)
	if err != nil {
		tb.Fatalf("nats server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		tb.Fatal("nats server not ready")
	}
	tb.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

// AdminDatabaseURL is the server on which tests create their databases:
// OTP_TEST_DATABASE_URL, else the local server as user postgres.
func AdminDatabaseURL() string {
	if u := os.Getenv("OTP_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
}

// Database creates a fresh, empty database for one test and drops it at cleanup. It
// returns the database's URL.
func Database(tb testing.TB) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin := AdminDatabaseURL()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		tb.Fatalf("connect to PostgreSQL at %s (set OTP_TEST_DATABASE_URL): %v", admin, err)
	}
	defer conn.Close(ctx)
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "otpflow_test_" + hex.EncodeToString(b)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		tb.Fatalf("create database: %v", err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, admin)
		if err != nil {
			tb.Logf("drop database %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			tb.Logf("drop database %s: %v", name, err)
		}
	})
	u, err := url.Parse(admin)
	if err != nil {
		tb.Fatalf("OTP_TEST_DATABASE_URL must be a postgres:// URL: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}

// Mail is one message an SMTP server accepted.
type Mail struct {
	From string
	To   []string
	Data []byte
	At   time.Time // when the server accepted it
}

// SMTPServer is a real SMTP server (emersion/go-smtp) on a loopback port that keeps every
// message it accepts.
type SMTPServer struct {
	Addr string

	mu     sync.Mutex
	mails  []Mail
	notify chan struct{}
	reject func(rcpt string) error
	accept func(Mail)
	delay  time.Duration
	open   int // sessions not yet logged out
	// sessions counts every connection the server took; conns holds the open ones.
	sessions int
	conns    map[*smtp.Conn]bool
}

// SetReject makes the server call f for every RCPT TO; a non-nil error refuses the
// recipient (an *smtp.SMTPError sets the reply code). Nil accepts every recipient.
func (s *SMTPServer) SetReject(f func(rcpt string) error) {
	s.mu.Lock()
	s.reject = f
	s.mu.Unlock()
}

// SetAccept makes the server call f with each message it accepts, once it is kept and
// before the client is told (the reply to the final dot waits for f): a hook to cause a
// fault right after a provider accepted a mail. Nil calls nothing.
func (s *SMTPServer) SetAccept(f func(Mail)) {
	s.mu.Lock()
	s.accept = f
	s.mu.Unlock()
}

// SetDelay makes the server take d to accept each message's data.
func (s *SMTPServer) SetDelay(d time.Duration) {
	s.mu.Lock()
	s.delay = d
	s.mu.Unlock()
}

// StartSMTP starts an SMTP server without TLS (use tls=none) and stops it at cleanup.
func StartSMTP(tb testing.TB) *SMTPServer {
	tb.Helper()
	s := &SMTPServer{notify: make(chan struct{}, 1)}
	srv := smtp.NewServer(s)
	srv.Domain = "localhost"
	srv.AllowInsecureAuth = true
	srv.ReadTimeout = 10 * time.Second
	srv.WriteTimeout = 10 * time.Second
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	s.Addr = ln.Addr().String()
	go func() { _ = srv.Serve(ln) }()
	tb.Cleanup(func() { _ = srv.Close() })
	return s
}

// URL is the OTP_SMTP_URL of this server.
func (s *SMTPServer) URL() string { return "smtp://" + s.Addr + "?tls=none" }

// Mails returns a copy of what the server accepted so far.
func (s *SMTPServer) Mails() []Mail {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Mail(nil), s.mails...)
}

// WaitFor waits until at least n mails arrived and returns them all.
func (s *SMTPServer) WaitFor(tb testing.TB, n int, timeout time.Duration) []Mail {
	tb.Helper()
	deadline := time.After(timeout)
	for {
		if m := s.Mails(); len(m) >= n {
			return m
		}
		select {
		case <-s.notify:
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			tb.Fatalf("SMTP server got %d mails, want %d within %v", len(s.Mails()), n, timeout)
		}
	}
}

// Open is the number of client connections the server has not closed yet.
func (s *SMTPServer) Open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open
}

// Sessions is the number of connections the server took since it started.
func (s *SMTPServer) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions
}

// DropConnections closes every open client connection without a word, as a relay does to
// connections it finds idle too long.
func (s *SMTPServer) DropConnections() {
	s.mu.Lock()
	conns := make([]*smtp.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.Conn().Close()
	}
}

// NewSession implements smtp.Backend.
func (s *SMTPServer) NewSession(c *smtp.Conn) (smtp.Session, error) {
	s.mu.Lock()
	s.open++
	s.sessions++
	if s.conns == nil {
		s.conns = map[*smtp.Conn]bool{}
	}
	s.conns[c] = true
	s.mu.Unlock()
	return &session{srv: s, conn: c}, nil
}

type session struct {
	srv  *SMTPServer
	conn *smtp.Conn
	from string
	to   []string
}

func (ss *session) Reset() { ss.from, ss.to = "", nil }
func (ss *session) Logout() error {
	ss.srv.mu.Lock()
	ss.srv.open--
	delete(ss.srv.conns, ss.conn)
	ss.srv.mu.Unlock()
	return nil
}
func (ss *session) Mail(from string, _ *smtp.MailOptions) error {
	ss.from = from
	return nil
}
func (ss *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.srv.mu.Lock()
	reject := ss.srv.reject
	ss.srv.mu.Unlock()
	if reject != nil {
		if err := reject(to); err != nil {
			return err
		}
	}
	ss.to = append(ss.to, to)
	return nil
}
func (ss *session) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	ss.srv.mu.Lock()
	delay := ss.srv.delay
	ss.srv.mu.Unlock()
	time.Sleep(delay)
	m := Mail{From: ss.from, To: ss.to, Data: data, At: time.Now()}
	ss.srv.mu.Lock()
	ss.srv.mails = append(ss.srv.mails, m)
	accept := ss.srv.accept
	ss.srv.mu.Unlock()
	if accept != nil {
		accept(m)
	}
	select {
	case ss.srv.notify <- struct{}{}:
	default:
	}
	return nil
}

// LogBuffer is a concurrency-safe writer that keeps everything written to it, for tests
// that read what services logged.
type LogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns everything written so far.
func (b *LogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Eventually polls cond every 50 ms until it holds or timeout passes.
func Eventually(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Must fails the test on err.
func Must(tb testing.TB, err error, what string, args ...any) {
	tb.Helper()
	if err != nil {
		tb.Fatalf("%s: %v", fmt.Sprintf(what, args...), err)
	}
}
