package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// rejections reads the otp.rejected events on OTP_EVENTS.
func rejections(t *testing.T, js jetstream.JetStream) []events.Rejected {
	t.Helper()
	var out []events.Rejected
	for _, m := range testenv.Messages(t, js, events.StreamEvents, "") {
		if !strings.HasPrefix(m.Subject, string(events.TypeRejected)+".") {
			continue
		}
		var r events.Rejected
		testenv.Must(t, json.Unmarshal(m.Data, &r), "decode rejected")
		out = append(out, r)
	}
	return out
}

func TestBadRequestsAreRejectedAndServingGoesOn(t *testing.T) {
	w := newWorld(t)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())

	bad := []struct {
		name, tenant, body string
		reason             events.RejectReason
	}{
		{"malformed JSON", "acme", `{"request_id":"bad-1","recipient":`, events.ReasonMalformedJSON},
		{"CRLF in recipient", "acme", `{"request_id":"bad-2","recipient":"ana@example.com\r\nBcc: all@example.com","purpose":"login"}`, events.ReasonHeaderInjection},
		{"invalid address", "acme", `{"request_id":"bad-3","recipient":"ana.example.com","purpose":"login"}`, events.ReasonInvalidRecipient},
		{"oversized", "acme", `{"request_id":"bad-4","recipient":"ana@example.com","purpose":"login","metadata":{"x":"` + strings.Repeat("x", 10_000) + `"}}`, events.ReasonTooLarge},
		{"unknown field", "acme", `{"request_id":"bad-5","recipient":"ana@example.com","purpose":"login","priority":"high"}`, events.ReasonUnknownField},
		{"missing purpose", "acme", `{"request_id":"bad-6","recipient":"ana@example.com"}`, events.ReasonMissingField},
		{"wrong tenant", "no!such!tenant", `{"request_id":"bad-7","recipient":"ana@example.com","purpose":"login"}`, events.ReasonInvalidTenant},
	}
	for _, b := range bad {
		a.request(t, b.tenant, b.body)
	}
	a.request(t, "acme", `{"request_id":"good-1","recipient":"bob@example.com","purpose":"login"}`)

	mails := w.smtp.WaitFor(t, 1, 30*time.Second)
	if got := mailsTo(mails, "bob@example.com"); len(got) != 1 {
		t.Fatalf("the valid request after the bad ones: %d mails", len(got))
	}
	idle(t, a.js, events.StreamRequests, events.ConsumerIssuer)

	var got []events.Rejected
	testenv.Eventually(t, 10*time.Second, "a rejection per bad request", func() bool {
		got = rejections(t, a.js)
		return len(got) >= len(bad)
	})
	if len(got) != len(bad) {
		t.Fatalf("%d rejections for %d bad requests: %+v", len(got), len(bad), got)
	}
	for i, b := range bad {
		if got[i].Reason != b.reason {
			t.Errorf("%s: reason %q, want %q (%+v)", b.name, got[i].Reason, b.reason, got[i])
		}
		if got[i].Detail == "" {
			t.Errorf("%s: no detail", b.name)
		}
		raw, _ := json.Marshal(got[i])
		if strings.Contains(string(raw), "all@example.com") {
			t.Errorf("%s: the rejection echoes the injected header: %s", b.name, raw)
		}
	}
	if len(mails) != 1 {
		t.Fatalf("bad requests sent mail: %d mails", len(mails))
	}
	// Terminated, not redelivered: the issuer consumer has nothing left and no redeliveries.
	c, err := a.js.Consumer(context.Background(), events.StreamRequests, events.ConsumerIssuer)
	testenv.Must(t, err, "issuer consumer")
	info, err := c.Info(context.Background())
	testenv.Must(t, err, "consumer info")
	if info.NumRedelivered != 0 || info.NumAckPending != 0 {
		t.Fatalf("bad requests were redelivered: %+v", info)
	}
}

func TestSameRequestTwiceSendsOneMail(t *testing.T) {
	w := newWorld(t)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())

	body := `{"request_id":"dup-1","recipient":"cy@example.com","purpose":"login"}`
	a.request(t, "acme", body)
	w.smtp.WaitFor(t, 1, 30*time.Second)
	a.request(t, "acme", body) // a retrying app: no Nats-Msg-Id, so the stream stores it again
	a.request(t, "acme", body)

	idle(t, a.js, events.StreamRequests, events.ConsumerIssuer)
	idle(t, a.js, events.StreamDispatch, events.ConsumerDispatcher)
	time.Sleep(500 * time.Millisecond)
	if got := mailsTo(w.smtp.Mails(), "cy@example.com"); len(got) != 1 {
		t.Fatalf("%d mails for one request_id published three times", len(got))
	}
	db := openDB(t, w.db)
	var challenges, codes int
	testenv.Must(t, db.QueryRow(context.Background(), `SELECT count(*) FROM issuer.challenges WHERE request_id = 'dup-1'`).Scan(&challenges), "count")
	testenv.Must(t, db.QueryRow(context.Background(), `SELECT count(*) FROM issuer.codes`).Scan(&codes), "count")
	if challenges != 1 || codes != 1 {
		t.Fatalf("%d challenges and %d codes, want 1 and 1", challenges, codes)
	}
	var issued int
	for _, m := range testenv.Messages(t, a.js, events.StreamEvents, "") {
		if strings.HasPrefix(m.Subject, "otp.issued.") {
			issued++
		}
	}
	if issued != 1 {
		t.Fatalf("%d otp.issued events, want 1", issued)
	}
}
