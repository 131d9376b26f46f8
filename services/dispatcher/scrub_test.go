package dispatcher

import (
	"context"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	gosmtp "github.com/emersion/go-smtp"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
)

func smtpOnly(sp mailer.Provider) []mailer.Provider { return []mailer.Provider{sp} }

// refuseNaming makes the SMTP server refuse every recipient with a reply that quotes it
// and a client IP, as Postfix does.
func refuseNaming(srv *testenv.SMTPServer, code int, enhanced gosmtp.EnhancedCode, text string) {
	srv.SetReject(func(rcpt string) error {
		return &gosmtp.SMTPError{Code: code, EnhancedCode: enhanced, Message: "<" + rcpt + ">: " + text + " (client [" + relayIP + "])"}
	})
}

// relayIP is the client IP a relay's reply quotes.
const relayIP = "203.0.113.45"

// assertNoAddress fails the test if what names rcpt (or any address) anywhere, its local
// part alone counts, or the IP the relay quoted.
func assertNoAddress(t *testing.T, what, text, rcpt string) {
	t.Helper()
	local := rcpt[:strings.IndexByte(rcpt, '@')]
	if strings.Contains(text, "@") || strings.Contains(text, local) || strings.Contains(text, relayIP) {
		t.Errorf("%s names the recipient or an IP:\n%s", what, text)
	}
}

// TestNoAddressInFailureText: a relay's reply that quotes the recipient and an IP reaches neither
// otp.delivery_failed's reason, nor dispatcher.deliveries.last_error, nor the log, nor a
// metric label, on a permanent failure and on transient ones that end in the DLQ.
func TestNoAddressInFailureText(t *testing.T) {
	const rcpt = "zoe.quinn+otp@example.com"
	t.Run("permanent", func(t *testing.T) {
		h := newHarnessConfig(t, Config{}, smtpOnly)
		refuseNaming(h.smtp, 550, gosmtp.EnhancedCode{5, 1, 1}, "Recipient address rejected: User unknown in virtual mailbox table")
		const challenge = "99999999-9999-4999-8999-999999999991"
		h.publish(t, challenge, rcpt, "424242", time.Now().Add(5*time.Minute), "dispatch:scrub:1")
		f := decode[events.DeliveryFailed](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivery_failed.acme", 1, 10*time.Second)[0])
		if !f.Permanent || !strings.Contains(f.Reason, "550") || !strings.Contains(f.Reason, "<address>: Recipient address rejected") ||
			!strings.Contains(f.Reason, "(client [<ip>])") {
			t.Fatalf("delivery_failed = %+v, want the relay's reply without the address", f)
		}
		h.assertNothingNames(t, challenge, rcpt, "Recipient address rejected")
	})
	t.Run("transient until the DLQ", func(t *testing.T) {
		// The breaker stays closed so that the last error is the relay's reply.
		h := newHarnessConfig(t, Config{MaxDeliver: 2, Guards: map[string]mailer.GuardConfig{"smtp": {BreakerFailures: 100}}}, smtpOnly)
		refuseNaming(h.smtp, 451, gosmtp.EnhancedCode{4, 7, 1}, "Recipient address rejected: Greylisted, try again later")
		const challenge = "99999999-9999-4999-8999-999999999992"
		h.publish(t, challenge, rcpt, "434343", time.Now().Add(5*time.Minute), "dispatch:scrub:2")
		dl := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq.acme", 1, 20*time.Second)[0]
		reason := dl.Header.Get(events.HeaderDLQReason)
		if !strings.Contains(reason, "deliveries exhausted") || !strings.Contains(reason, "<address>: Recipient address rejected: Greylisted") {
			t.Fatalf("DLQ reason = %q, want the relay's reply without the address", reason)
		}
		assertNoAddress(t, "the DLQ reason", reason, rcpt)
		// The dead letter as a reader of OTP_DLQ sees it: the job sealed, the recipient
		// by subject hash.
		stored := ""
		for _, m := range testenv.Messages(t, h.js, events.StreamDLQ, "") {
			for k, v := range m.Header {
				stored += k + ": " + strings.Join(v, ", ") + "\n"
			}
			stored += string(m.Data) + "\n"
		}
		assertNoAddress(t, "OTP_DLQ", stored, rcpt)
		testenv.AssertNoPlaintext(t, stored, "434343")
		if got := dl.Header.Get(events.HeaderRecipientHash); got != h.subjects.Subject("acme", rcpt) {
			t.Errorf("%s = %q", events.HeaderRecipientHash, got)
		}
		f := decode[events.DeliveryFailed](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivery_failed.acme", 1, 10*time.Second)[0])
		if f.Permanent || !strings.Contains(f.Reason, "Greylisted") {
			t.Fatalf("delivery_failed = %+v", f)
		}
		if !strings.Contains(h.log.String(), "will retry") {
			t.Fatalf("no retry was logged:\n%s", h.log.String())
		}
		h.assertNothingNames(t, challenge, rcpt, "Greylisted")
	})
}

// assertNothingNames checks every event published, the challenge's delivery row, the log
// and the metric labels for rcpt; reply is a piece of the relay's answer that the event,
// the row and the log must still carry.
func (h *harness) assertNothingNames(t *testing.T, challenge, rcpt, reply string) {
	t.Helper()
	for _, m := range testenv.Messages(t, h.js, events.StreamEvents, "") {
		text := m.Subject + " " + string(m.Data)
		for k, v := range m.Header {
			text += " " + k + ": " + strings.Join(v, ", ")
		}
		assertNoAddress(t, "event "+m.Subject, text, rcpt)
	}

	var lastError, row string
	testenv.Eventually(t, 10*time.Second, "the delivery row to be completed", func() bool {
		err := h.pool.QueryRow(context.Background(), `SELECT last_error, d::text FROM dispatcher.deliveries d
			WHERE challenge_id = $1 AND status = 'failed'`, challenge).Scan(&lastError, &row)
		return err == nil
	})
	if !strings.Contains(lastError, reply) || !strings.Contains(lastError, "<address>") {
		t.Errorf("last_error = %q, want the relay's reply without the address", lastError)
	}
	assertNoAddress(t, "the delivery row", row, rcpt)

	testenv.Eventually(t, 5*time.Second, "the settled job to be logged", func() bool {
		return strings.Contains(h.log.String(), "dispatch settled")
	})
	logs := h.log.String()
	if !strings.Contains(logs, reply) {
		t.Errorf("the log lacks the relay's reply %q:\n%s", reply, logs)
	}
	assertNoAddress(t, "the log", logs, rcpt)

	families, err := h.reg.Gather()
	testenv.Must(t, err, "gather metrics")
	var sends float64
	for _, mf := range families {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				assertNoAddress(t, "label "+mf.GetName()+"{"+l.GetName()+"}", l.GetValue(), rcpt)
			}
			if mf.GetName() == "otpflow_dispatcher_sends_total" {
				sends += m.GetCounter().GetValue()
			}
		}
	}
	if sends == 0 {
		t.Error("no provider call was counted")
	}
}

// TestLongNonASCIIReplyIsRecorded: a relay's reply in another language, longer than the
// stored reason, is cut on a character boundary. A cut inside a UTF-8 sequence would make
// PostgreSQL refuse the whole record batch, and every job in it would be sent again.
func TestLongNonASCIIReplyIsRecorded(t *testing.T) {
	h := newHarnessConfig(t, Config{}, smtpOnly)
	h.smtp.SetReject(func(string) error {
		return &gosmtp.SMTPError{Code: 550, EnhancedCode: gosmtp.EnhancedCode{5, 1, 1}, Message: "Empfänger unbekannt: " + strings.Repeat("ä", 400)}
	})
	const challenge = "99999999-9999-4999-8999-999999999993"
	h.publish(t, challenge, "ana@example.com", "454545", time.Now().Add(5*time.Minute), "dispatch:utf8:1")
	f := decode[events.DeliveryFailed](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivery_failed.acme", 1, 15*time.Second)[0])
	var stored string
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT last_error FROM dispatcher.deliveries WHERE challenge_id = $1`, challenge).Scan(&stored), "row")
	if !utf8.ValidString(f.Reason) || !strings.Contains(stored, "Empfänger unbekannt") || len(stored) > 500 {
		t.Fatalf("reason %q, stored %q", f.Reason, stored)
	}
}
