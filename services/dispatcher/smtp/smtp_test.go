package smtp_test

import (
	"context"
	"errors"
	"strings"
	"testing"

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
	if c, _ := smtp.ParseURL("smtp://relay.example?tls=implicit"); c.Port != 465 {
		t.Fatalf("implicit default port = %d", c.Port)
	}
	for _, bad := range []string{"http://x", "smtp://", "smtp://h?tls=maybe", "smtp://h:99999"} {
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
