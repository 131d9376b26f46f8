package smtp_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/textproto"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/smtp"
)

// script is how a scripted SMTP peer answers; an empty reply is the usual success, "close"
// drops the connection, "hang" never answers.
type script struct {
	greeting, auth, mail, rcpt, data, final string
	// rset answers RSET; final2 answers the final dot of a connection's second and later
	// messages (empty: as final). datas, when set, counts the messages that reached DATA.
	rset, final2 string
	datas        *atomic.Int32
	// delay holds replies back, by what they answer: "greeting" or a verb ("EHLO",
	// "MAIL", ...); dots, when set, counts the messages whose final dot came; ended, when
	// set, gets a value each time a conversation ends.
	delay map[string]time.Duration
	dots  *atomic.Int32
	ended chan struct{}
}

// scripted runs an SMTP peer that follows sc, for the failures a well-behaved server does
// not produce on demand (a reply lost after the final dot, a hung greeting).
func scripted(t *testing.T, sc script) smtp.Config {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go converse(conn, sc)
		}
	}()
	addr := ln.Addr().(*net.TCPAddr)
	return smtp.Config{Host: "127.0.0.1", Port: addr.Port, TLS: smtp.TLSNone, Timeout: 500 * time.Millisecond}
}

func converse(conn net.Conn, sc script) {
	defer conn.Close()
	if sc.ended != nil {
		defer func() { sc.ended <- struct{}{} }()
	}
	r := bufio.NewReader(conn)
	verb := "greeting"
	say := func(reply, def string) bool {
		time.Sleep(sc.delay[verb])
		switch reply {
		case "close":
			return false
		case "hang":
			time.Sleep(3 * time.Second)
			return false
		case "":
			reply = def
		}
		_, err := conn.Write([]byte(reply + "\r\n"))
		return err == nil
	}
	if !say(sc.greeting, "220 localhost ESMTP ready") {
		return
	}
	messages := 0
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		verb = strings.ToUpper(strings.Fields(line + " x")[0])
		ok := true
		switch verb {
		case "EHLO", "HELO":
			ext := "250-localhost\r\n250 8BITMIME"
			if sc.auth != "" {
				ext = "250-localhost\r\n250 AUTH PLAIN LOGIN"
			}
			ok = say(ext, "")
		case "AUTH":
			ok = say(sc.auth, "235 ok")
		case "MAIL":
			ok = say(sc.mail, "250 ok")
		case "RCPT":
			ok = say(sc.rcpt, "250 ok")
		case "DATA":
			if ok = say(sc.data, "354 go ahead"); ok && (sc.data == "" || strings.HasPrefix(sc.data, "354")) {
				if sc.datas != nil {
					sc.datas.Add(1)
				}
				for {
					l, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if l == ".\r\n" {
						break
					}
				}
				messages++
				if sc.dots != nil {
					sc.dots.Add(1)
				}
				final := sc.final
				if messages > 1 && sc.final2 != "" {
					final = sc.final2
				}
				ok = say(final, "250 queued as 1")
			}
		case "RSET":
			ok = say(sc.rset, "250 ok")
		case "QUIT":
			say("221 bye", "")
			return
		default:
			ok = say("250 ok", "")
		}
		if !ok {
			return
		}
	}
}

func TestSMTPClassification(t *testing.T) {
	tests := []struct {
		name string
		sc   script
		want mailer.Class
	}{
		{"550 unknown recipient", script{rcpt: "550 5.1.1 no such user"}, mailer.Permanent},
		{"553 bad recipient address", script{rcpt: "553 5.1.3 bad address"}, mailer.Permanent},
		{"450 mailbox busy", script{rcpt: "450 4.2.1 try later"}, mailer.Transient},
		{"451 local error", script{rcpt: "451 4.3.0 local error"}, mailer.Transient},
		{"452 recipient over quota", script{rcpt: "452 4.2.2 mailbox full"}, mailer.Transient},
		{"454 send rate", script{mail: "454 4.7.0 Throttling failure: Maximum sending rate exceeded."}, mailer.Throttled},
		{"454 daily quota", script{mail: "454 4.7.0 Throttling failure: Daily message quota exceeded."}, mailer.QuotaExhausted},
		{"421 at MAIL", script{mail: "421 4.3.2 service shutting down"}, mailer.Transient},
		{"550 sender refused", script{mail: "550 5.7.1 sender not allowed"}, mailer.ProviderDown},
		{"552 too large", script{final: "552 5.3.4 message too big"}, mailer.Permanent},
		{"554 content rejected", script{final: "554 5.7.1 rejected as spam"}, mailer.Permanent},
		{"451 after the dot", script{final: "451 4.3.0 try again"}, mailer.Transient},
		{"no answer after the dot", script{final: "close"}, mailer.Ambiguous},
		{"421 greeting", script{greeting: "421 4.3.2 too busy"}, mailer.Transient},
		{"greeting never comes", script{greeting: "hang"}, mailer.Transient},
		{"reset before greeting", script{greeting: "close"}, mailer.Transient},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := smtp.New(scripted(t, tt.sc))
			_, err := p.Send(context.Background(), message("ana@example.com"))
			if c := mailer.ClassOf(err); err == nil || c != tt.want {
				t.Fatalf("err = %v (class %s), want %s", err, c, tt.want)
			}
		})
	}
}

func TestSMTPClassificationAuthAndNetwork(t *testing.T) {
	// Credentials are never sent over an unencrypted connection: a configuration error.
	cfg := scripted(t, script{auth: "235 ok"})
	cfg.Username, cfg.Password = "user", "secret"
	if _, err := smtp.New(cfg).Send(context.Background(), message("ana@example.com")); mailer.ClassOf(err) != mailer.ProviderDown {
		t.Errorf("credentials over tls=none: %v, want provider_down", err)
	}
	// A relay that refuses the credentials (535) is our configuration, not the message.
	authErr := fmt.Errorf("dial failed: SMTP AUTH failed: %w", &textproto.Error{Code: 535, Msg: "5.7.8 authentication failed"})
	if c := smtp.Classify(authErr); c != mailer.ProviderDown {
		t.Errorf("535: %s, want provider_down", c)
	}
	dns := smtp.Config{Host: "smtp.does-not-exist.invalid", Port: 25, TLS: smtp.TLSNone, Timeout: 2 * time.Second}
	if _, err := smtp.New(dns).Send(context.Background(), message("ana@example.com")); mailer.ClassOf(err) != mailer.ProviderDown {
		t.Errorf("DNS failure: %v, want provider_down", err)
	}
	ok := scripted(t, script{})
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	if _, err := smtp.New(ok).Send(ctx, message("ana@example.com")); err == nil || mailer.ClassOf(err) != mailer.Transient {
		t.Errorf("expired context: %v, want transient", err)
	}
	starttls := scripted(t, script{})
	starttls.TLS = smtp.TLSStartTLS
	if _, err := smtp.New(starttls).Send(context.Background(), message("ana@example.com")); mailer.ClassOf(err) != mailer.ProviderDown {
		t.Errorf("relay without STARTTLS while it is required: %v, want provider_down", err)
	}
}
