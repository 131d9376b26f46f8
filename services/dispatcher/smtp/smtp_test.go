package smtp_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gosmtp "github.com/emersion/go-smtp"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/smtp"
	gomail "github.com/wneessen/go-mail"
)

func message(to string) *mailer.Message {
	return &mailer.Message{From: "Acme <no-reply@acme.example>", To: to, Subject: "Your verification code: 123456",
		Text: "code 123456", HTML: "<p>123456</p>", Headers: map[string]string{"X-Otp-Challenge-Id": "c1"}}
}

func TestSendAndClassify(t *testing.T) {
	srv := testenv.StartSMTP(t)
	srv.SetReject(func(rcpt string) error {
		switch {
		case strings.HasPrefix(rcpt, "gone@"):
			return &gosmtp.SMTPError{Code: 550, EnhancedCode: gosmtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		case strings.HasPrefix(rcpt, "busy@"):
			return &gosmtp.SMTPError{Code: 451, EnhancedCode: gosmtp.EnhancedCode{4, 3, 0}, Message: "try later"}
		}
		return nil
	})
	cfg, err := smtp.ParseURL(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	p := smtp.New(cfg)
	if _, err := p.Send(context.Background(), message("ana@example.com")); err != nil {
		t.Fatalf("send: %v", err)
	}
	got := srv.Mails()
	if len(got) != 1 || got[0].To[0] != "ana@example.com" || !strings.Contains(string(got[0].Data), "X-Otp-Challenge-Id: c1") {
		t.Fatalf("mail not received as sent: %+v", got)
	}
	for rcpt, want := range map[string]mailer.Class{"gone@example.com": mailer.Permanent, "busy@example.com": mailer.Transient} {
		_, err := p.Send(context.Background(), message(rcpt))
		var se *mailer.SendError
		if !errors.As(err, &se) || se.Class != want {
			t.Errorf("%s: %v, want class %s", rcpt, err, want)
		}
	}
	down := smtp.New(smtp.Config{Host: "127.0.0.1", Port: 1, TLS: smtp.TLSNone})
	if _, err := down.Send(context.Background(), message("ana@example.com")); mailer.ClassOf(err) != mailer.ProviderDown {
		t.Errorf("connection refused: %v, want provider_down", err)
	}
}

func TestParseURL(t *testing.T) {
	c, err := smtp.ParseURL("smtp://user:secret@relay.example:2525")
	if err != nil || c.TLS != smtp.TLSStartTLS || c.Port != 2525 || c.Username != "user" || c.Password != "secret" {
		t.Fatalf("%+v %v", c, err)
	}
	if strings.Contains(c.String(), "secret") {
		t.Fatal("String leaks the password")
	}
	if c, _ := smtp.ParseURL("smtp://relay.example?tls=implicit"); c.Port != 465 || c.Pool != smtp.DefaultPool {
		t.Fatalf("implicit default port = %d, pool %d", c.Port, c.Pool)
	}
	if c, _ := smtp.ParseURL("smtp://relay.example?tls=none&pool=0"); c.Pool != 0 {
		t.Fatalf("pool=0 read as %d", c.Pool)
	}
	for _, bad := range []string{"http://x", "smtp://", "smtp://h?tls=maybe", "smtp://h:99999", "smtp://h?pool=-1", "smtp://h?pool=many"} {
		if _, err := smtp.ParseURL(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

// TestErrorTextNamesNoRecipient: relays quote the refused recipient in their reply, and
// go-mail lists the "affected recipient(s)"; neither may reach the error's text, while
// the class and go-mail's error stay reachable.
func TestErrorTextNamesNoRecipient(t *testing.T) {
	srv := testenv.StartSMTP(t)
	srv.SetReject(func(rcpt string) error {
		return &gosmtp.SMTPError{Code: 550, EnhancedCode: gosmtp.EnhancedCode{5, 1, 1},
			Message: "<" + rcpt + ">: Recipient address rejected: User unknown in virtual mailbox table"}
	})
	cfg, err := smtp.ParseURL(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	for _, rcpt := range []string{"ana@example.com", "josé.müller+otp@exämple.de"} {
		_, err := smtp.New(cfg).Send(context.Background(), message(rcpt))
		if mailer.ClassOf(err) != mailer.Permanent {
			t.Fatalf("%v: want class permanent", err)
		}
		var ge *gomail.SendError
		if !errors.As(err, &ge) || ge.ErrorCode() != 550 || !strings.Contains(ge.Error(), rcpt) {
			t.Fatalf("go-mail's error is no longer reachable from %v", err)
		}
		local := rcpt[:strings.IndexByte(rcpt, '@')]
		text := err.Error()
		if strings.Contains(text, "@") || strings.Contains(text, local) {
			t.Fatalf("error text names the recipient: %q", text)
		}
		if !strings.Contains(text, `550 "5.1.1 <address>: Recipient address rejected: User unknown`) {
			t.Fatalf("error text lost the relay's reply: %q", text)
		}
	}

	// A recipient go-mail cannot parse is refused before any connection, with the
	// address quoted in net/mail's error.
	_, err = smtp.New(cfg).Send(context.Background(), message("ana@@example.com"))
	if mailer.ClassOf(err) != mailer.Permanent || strings.Contains(err.Error(), "ana") {
		t.Fatalf("unparsable recipient: %v", err)
	}
}

// TestConnectionsAreReused: sends share open connections to the relay. 60 messages, 6 at a
// time, take at most 6 connections (one each, without reuse); a connection serves at most
// MaxPerConn messages; pool=0 goes back to a connection per message.
func TestConnectionsAreReused(t *testing.T) {
	srv, cfg, p := pooledRelay(t)
	sendAll := func(p *smtp.Provider, n, parallel int) {
		t.Helper()
		work := make(chan int)
		var wg sync.WaitGroup
		for range parallel {
			wg.Go(func() {
				for i := range work {
					if _, err := p.Send(context.Background(), message(fmt.Sprintf("u%d@example.com", i))); err != nil {
						t.Errorf("send %d: %v", i, err)
					}
				}
			})
		}
		for i := range n {
			work <- i
		}
		close(work)
		wg.Wait()
	}
	sendAll(p, 60, 6)
	if got := len(srv.Mails()); got != 60 {
		t.Fatalf("%d mails, want 60", got)
	}
	if n := srv.Sessions(); n < 1 || n > 6 {
		t.Errorf("%d connections for 60 mails 6 at a time, want at most 6", n)
	}
	fresh := smtp.New(cfg)
	defer fresh.Close()
	before := srv.Sessions()
	sendAll(fresh, smtp.MaxPerConn+1, 1)
	if n := srv.Sessions() - before; n != 2 {
		t.Errorf("%d new connections for %d mails one at a time, want 2 (at most %d per connection)", n, smtp.MaxPerConn+1, smtp.MaxPerConn)
	}

	cfg.Pool = 0
	single := smtp.New(cfg)
	before = srv.Sessions()
	sendAll(single, 5, 1)
	if n := srv.Sessions() - before; n != 5 {
		t.Errorf("pool=0: %d connections for 5 mails, want 5", n)
	}
}

// TestAConnectionTheRelayDroppedIsReplaced: the relay closes an idle connection; the next
// send finds it dead before handing the message over and sends it, once, on a new one.
func TestAConnectionTheRelayDroppedIsReplaced(t *testing.T) {
	srv, _, p := pooledRelay(t)
	if _, err := p.Send(context.Background(), message("ana@example.com")); err != nil {
		t.Fatal(err)
	}
	srv.DropConnections()
	testenv.Eventually(t, 5*time.Second, "the relay to drop the connection", func() bool { return srv.Open() == 0 })
	if _, err := p.Send(context.Background(), message("bea@example.com")); err != nil {
		t.Fatalf("send after the relay dropped the connection: %v", err)
	}
	mails := srv.Mails()
	if len(mails) != 2 || mails[1].To[0] != "bea@example.com" || srv.Sessions() != 2 {
		t.Fatalf("%d mails over %d connections, want 2 over 2: %+v", len(mails), srv.Sessions(), mails)
	}
}

// TestAReusedConnectionKeepsEachSendsDeadline: a connection is dialled by one send and
// reused by others, each with its own deadline. A send with 1 s left on a connection
// opened with 10 s must not wait 2 s for a slow relay (the mail would go out after the
// code's expiry); a send with 10 s on a connection opened with 400 ms must not give up
// after 200 ms (it would report a mail the relay took as ambiguous, and it would be sent
// again).
func TestAReusedConnectionKeepsEachSendsDeadline(t *testing.T) {
	srv, cfg, p := pooledRelay(t)
	if _, err := p.Send(context.Background(), message("ana@example.com")); err != nil {
		t.Fatal(err)
	}
	srv.SetDelay(2 * time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_, err := p.Send(ctx, message("bea@example.com"))
	cancel()
	if err == nil {
		t.Fatal("a send with 1 s left waited out a relay taking 2 s and succeeded")
	}

	short := smtp.New(cfg)
	defer short.Close()
	srv.SetDelay(0)
	ctx, cancel = context.WithTimeout(context.Background(), 400*time.Millisecond)
	_, err = short.Send(ctx, message("cem@example.com"))
	cancel()
	testenv.Must(t, err, "send with 400ms")
	srv.SetDelay(300 * time.Millisecond)
	if _, err := short.Send(context.Background(), message("dan@example.com")); err != nil {
		t.Fatalf("a send with 10 s on a connection dialled with 400 ms: %v", err)
	}
	if srv.Sessions() != 2 { // one per provider: the short one's was reused with its new deadline
		t.Errorf("%d connections, want 2", srv.Sessions())
	}
}

// TestAMailTheRelayTookIsNotSentAgain: the relay answers 250 to the final dot and hangs up
// on the RSET that follows: the send succeeded, and the message went over once.
func TestAMailTheRelayTookIsNotSentAgain(t *testing.T) {
	var datas atomic.Int32
	cfg := scripted(t, script{rset: "close", datas: &datas})
	cfg.Pool = smtp.DefaultPool
	p := smtp.New(cfg)
	if _, err := p.Send(context.Background(), message("ana@example.com")); err != nil {
		t.Fatalf("a mail the relay accepted: %v", err)
	}
	if n := datas.Load(); n != 1 {
		t.Errorf("%d transactions reached DATA, want 1", n)
	}
}

// TestNothingPastDataIsSentTwice: on a reused connection, a message whose final answer
// never comes is ambiguous and is not sent again on a new connection (only a connection
// that fails before MAIL FROM is answered is).
func TestNothingPastDataIsSentTwice(t *testing.T) {
	var datas atomic.Int32
	cfg := scripted(t, script{final2: "close", datas: &datas})
	cfg.Pool = smtp.DefaultPool
	p := smtp.New(cfg)
	if _, err := p.Send(context.Background(), message("ana@example.com")); err != nil {
		t.Fatal(err)
	}
	_, err := p.Send(context.Background(), message("bea@example.com"))
	if c := mailer.ClassOf(err); c != mailer.Ambiguous {
		t.Fatalf("reply to the final dot lost on a reused connection: %v, want ambiguous", err)
	}
	if n := datas.Load(); n != 2 {
		t.Errorf("%d transactions reached DATA, want 2 (no re-send)", n)
	}
}

// TestASlowRelayIsNeverHandedAMailAfterTheDeadline: go-mail gives each phase of the
// exchange a fresh timeout (the connect, the greeting, the message), so a relay slow in
// each could take the mail after the caller's deadline. The greeting and EHLO take 0.9 s
// each and MAIL FROM 0.3 s; the send has 2 s, so each phase gets 1 s and all of them fit,
// but MAIL FROM's answer comes at 2.1 s: the send must give up at its deadline, and the
// relay must never see the message's final dot.
func TestASlowRelayIsNeverHandedAMailAfterTheDeadline(t *testing.T) {
	var dots atomic.Int32
	ended := make(chan struct{}, 1)
	cfg := scripted(t, script{dots: &dots, ended: ended,
		delay: map[string]time.Duration{"greeting": 900 * time.Millisecond, "EHLO": 900 * time.Millisecond, "MAIL": 300 * time.Millisecond}})
	cfg.Timeout = 10 * time.Second
	p := smtp.New(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := p.Send(ctx, message("ana@example.com")); err == nil {
		t.Fatal("a relay that answered MAIL FROM after the deadline was handed the mail")
	}
	select { // the relay reads what the client wrote until the client hangs up
	case <-ended:
	case <-time.After(30 * time.Second):
		t.Fatal("the client never hung up")
	}
	if n := dots.Load(); n != 0 {
		t.Errorf("the relay received %d message(s) after the send's deadline", n)
	}
}

// pooledRelay is an SMTP test server and a provider with the default pool in front of it,
// closed at the test's end.
func pooledRelay(t *testing.T) (*testenv.SMTPServer, smtp.Config, *smtp.Provider) {
	t.Helper()
	srv := testenv.StartSMTP(t)
	cfg, err := smtp.ParseURL(srv.URL())
	testenv.Must(t, err, "url")
	p := smtp.New(cfg)
	t.Cleanup(func() { p.Close() })
	return srv, cfg, p
}
