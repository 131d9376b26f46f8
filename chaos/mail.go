package chaos

import (
	"io"
	"mime/quotedprintable"
	"net/mail"
	"regexp"
	"strings"
	"sync"
)

// Mail is one message a sink accepted: the SMTP relay or the SES v2 endpoint.
type Mail struct {
	Sink        string // "smtp" or "ses"
	ChallengeID string // the X-Otp-Challenge-Id header
	To          string
	Code        string // the code in its text
}

var sixDigits = regexp.MustCompile(`\b(\d{6})\b`)

// mailbox keeps the sinks' mails parsed, reading only what is new on each look.
type mailbox struct {
	mu        sync.Mutex
	mails     []Mail
	smtp, ses int // how many of each sink's mails are parsed
}

// Mails reads what both sinks accepted so far.
func (e *Env) Mails() []Mail {
	b := &e.mailbox
	b.mu.Lock()
	defer b.mu.Unlock()
	smtp, ses := e.SMTP.Mails(), e.SES.Emails()
	for _, m := range smtp[b.smtp:] {
		mm := Mail{Sink: "smtp"}
		if len(m.To) > 0 {
			mm.To = m.To[0]
		}
		if msg, err := mail.ReadMessage(strings.NewReader(string(m.Data))); err == nil {
			mm.ChallengeID = msg.Header.Get("X-Otp-Challenge-Id")
			body, _ := io.ReadAll(quotedprintable.NewReader(msg.Body))
			mm.Code = codeIn(string(body))
		}
		b.mails = append(b.mails, mm)
	}
	for _, m := range ses[b.ses:] {
		mm := Mail{Sink: "ses", ChallengeID: m.Headers["X-Otp-Challenge-Id"], Code: codeIn(m.Text)}
		if len(m.To) > 0 {
			mm.To = m.To[0]
		}
		b.mails = append(b.mails, mm)
	}
	b.smtp, b.ses = len(smtp), len(ses)
	return append([]Mail(nil), b.mails...)
}

// codeIn is the first six-digit number of a mail's text: the code (the templates name
// the lifetime in minutes, never with six digits).
func codeIn(text string) string {
	if m := sixDigits.FindStringSubmatch(text); m != nil {
		return m[1]
	}
	return ""
}
