package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// checkFlow drives one request through a running pipeline as an upstream app does and
// checks every step: mail with the code, wrong codes counted down, the right code
// verified once, and the audit log in order. It returns the code.
func checkFlow(t *testing.T, w *world, a *app, tenant, requestID, rcpt string) string {
	t.Helper()
	a.request(t, tenant, fmt.Sprintf(`{"request_id":%q,"recipient":%q,"purpose":"login","locale":"en",
		"ttl_seconds":300,"context":{"ip":"203.0.113.7","user_agent":"test","session_id":""},"metadata":{"app":"web"}}`, requestID, rcpt))
	var got []testenv.Mail
	testenv.Eventually(t, 30*time.Second, "the mail", func() bool {
		got = mailsTo(w.smtp.Mails(), rcpt)
		return len(got) > 0
	})
	m := got[0]
	if m.From != "no-reply@acme.example" {
		t.Errorf("envelope from = %q", m.From)
	}
	code := codeOf(t, m)
	for _, want := range []string{"5 minutes", "Did not ask for this code?", "text/html", "text/plain"} {
		if !strings.Contains(decodedBody(t, m), want) {
			t.Errorf("mail lacks %q", want)
		}
	}

	// The audit log has the issue and the delivery before the user acts.
	db := openDB(t, w.db)
	testenv.Eventually(t, 30*time.Second, "issued and delivered in the audit log", func() bool {
		return slices.Equal(auditTypes(t, db, tenant, requestID), []string{"otp.issued", "otp.delivered"})
	})

	wrong := fmt.Sprintf("%06d", (atoi(code)+1)%1_000_000)
	if r := a.verify(t, tenant, requestID, wrong); r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 4 {
		t.Fatalf("first wrong code: %+v, want invalid_code with 4 left", r)
	}
	if r := a.verify(t, tenant, requestID, wrong); r.Status != events.StatusInvalidCode || r.AttemptsRemaining != 3 {
		t.Fatalf("second wrong code: %+v, want invalid_code with 3 left", r)
	}
	if r := a.verify(t, tenant, requestID, code); r.Status != events.StatusVerified {
		t.Fatalf("right code: %+v, want verified", r)
	}
	if r := a.verify(t, tenant, requestID, code); r.Status != events.StatusAlreadyUsed {
		t.Fatalf("right code again: %+v, want already_used", r)
	}
	if r := a.verify(t, tenant, "never-requested", code); r.Status != events.StatusNotFound {
		t.Fatalf("unknown request: %+v, want not_found", r)
	}

	want := []string{"otp.issued", "otp.delivered", "otp.verify_failed", "otp.verify_failed", "otp.verified", "otp.verify_failed"}
	testenv.Eventually(t, 30*time.Second, "the whole flow in the audit log", func() bool {
		return slices.Equal(auditTypes(t, db, tenant, requestID), want)
	})
	return code
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

// checkNoCodeLeak fails if code appears in any OTP_EVENTS message, any audit row or logs.
func checkNoCodeLeak(t *testing.T, w *world, a *app, code, logs string) {
	t.Helper()
	msgs := testenv.Messages(t, a.js, events.StreamEvents, "")
	if len(msgs) == 0 {
		t.Fatal("no events to search")
	}
	for _, m := range msgs {
		text := string(m.Data) + fmt.Sprint(m.Header)
		if containsCode(text, code) {
			t.Errorf("code appears in %s: %s", m.Subject, text)
		}
	}
	db := openDB(t, w.db)
	var rows string
	err := db.QueryRow(context.Background(), `SELECT coalesce(string_agg(e::text, E'\n'), '') FROM audit.events e`).Scan(&rows)
	testenv.Must(t, err, "read audit rows")
	if rows == "" {
		t.Fatal("no audit rows to search")
	}
	if containsCode(rows, code) {
		t.Errorf("code appears in the audit log:\n%s", rows)
	}
	if logs == "" {
		t.Fatal("no logs to search")
	}
	if containsCode(logs, code) {
		t.Errorf("code appears in the logs:\n%s", logs)
	}
	for _, plain := range []string{"sealed_code", "code_hmac"} {
		if strings.Contains(logs, plain) {
			t.Errorf("logs carry %s", plain)
		}
	}
}

func TestEndToEndInProcess(t *testing.T) {
	w := newWorld(t)
	logs := &testenv.LogBuffer{}
	stop := w.runInProcess(t, logs)
	a := newApp(t, w.nats.ClientURL())

	code := checkFlow(t, w, a, "acme", "signup-7f3a", "ana@example.com")
	stop()
	checkNoCodeLeak(t, w, a, code, logs.String())
}
