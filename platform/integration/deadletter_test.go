package platform_test

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// dump is everything a reader of OTP_DLQ sees of its messages: subjects, headers, bodies.
func dump(msgs []*jetstream.RawStreamMsg) string {
	var b strings.Builder
	for _, m := range msgs {
		b.WriteString(m.Subject + "\n")
		for k, v := range m.Header {
			b.WriteString(k + ": " + strings.Join(v, ", ") + "\n")
		}
		b.Write(m.Data)
		b.WriteString("\n")
	}
	return b.String()
}

// TestDeadLetterIsSealedWithTheRecipientHash: a request that names a person, dead-lettered
// with a reason that quotes the address and the client IP, rests on OTP_DLQ (read back
// message by message through NATS) without the address or the IP anywhere; its header
// carries the person's subject hash, and the original comes back whole with the DLQ key
// only, and only while its headers are untouched.
func TestDeadLetterIsSealedWithTheRecipientHash(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Second, MaxDeliver: 5})
	const body = `{"request_id":"r1","recipient":"Zoe.Quinn@Example.com","purpose":"login","context":{"ip":"203.0.113.77"}}`
	orig := nats.NewMsg("settle.acme")
	orig.Data = []byte(body)
	orig.Header.Set("X-App-User", "zoe.quinn@example.com")
	orig.Header.Set(jetstream.MsgIDHeader, "r1")
	_, err := e.js.PublishMsg(t.Context(), orig)
	testenv.Must(t, err, "publish")
	e.consumer(1).Handle(t.Context(), e.fetch(t, 1), func(_ context.Context, batch []*platform.Delivery) error {
		batch[0].Settle(platform.DeadLetter("acme", "relay said no to <zoe.quinn@example.com> from [203.0.113.77]"))
		return nil
	})

	dl := testenv.WaitMessages(t, e.js, events.StreamDLQ, "otp.dlq.acme", 1, 10*time.Second)
	testenv.AssertNoPlaintext(t, dump(testenv.Messages(t, e.js, events.StreamDLQ, "")),
		"zoe.quinn@example.com", "zoe.quinn", "203.0.113.77")
	m := dl[0]
	hash := m.Header.Get(events.HeaderRecipientHash)
	if hash != e.subjects.Subject("acme", "zoe.quinn@example.com") || !e.subjects.MatchesSubject(hash, "acme", "ZOE.QUINN@example.com") {
		t.Errorf("%s = %q, want the subject hash of the recipient", events.HeaderRecipientHash, hash)
	}
	if r := m.Header.Get(events.HeaderDLQReason); r != "relay said no to <address> from [<ip>]" {
		t.Errorf("reason %q", r)
	}
	if m.Header.Get(events.HeaderDLQSubject) != "settle.acme" || m.Header.Get(events.HeaderDLQStream) != "SETTLE" ||
		m.Header.Get(events.HeaderDLQSequence) != "1" || m.Header.Get(jetstream.MsgIDHeader) != "dlq:SETTLE:1" {
		t.Errorf("origin headers %v", m.Header)
	}

	got := testenv.OpenDeadLetter(t, e.dlq, m)
	if got.Subject != "settle.acme" || string(got.Data) != body || got.Header["X-App-User"][0] != "zoe.quinn@example.com" ||
		got.Header[jetstream.MsgIDHeader][0] != "r1" {
		t.Errorf("opened %+v", got)
	}

	other, err := keys.ParseSealer(keys.Generate("d1", 32))
	testenv.Must(t, err, "other key")
	if _, err := platform.OpenDeadLetter(other, m.Header, m.Data); err == nil {
		t.Error("a dead letter opened under another key")
	}
	for _, h := range []string{events.HeaderRecipientHash, events.HeaderDLQSequence, events.HeaderDLQStream} {
		edited := nats.Header{}
		for k, v := range m.Header {
			edited[k] = append([]string(nil), v...)
		}
		edited.Set(h, "2")
		if _, err := platform.OpenDeadLetter(e.dlq, edited, m.Data); err == nil {
			t.Errorf("a dead letter with %s edited opened", h)
		}
	}
}

// TestNoDeadLetterWithoutAKey: a consumer without a DLQ key writes no dead letter (never
// one in the clear); the message is retried instead.
func TestNoDeadLetterWithoutAKey(t *testing.T) {
	e := newSettleEnv(t, jetstream.ConsumerConfig{AckWait: 5 * time.Second, MaxDeliver: 5})
	e.publish(t, `{"recipient":"ana@example.com"}`)
	c := platform.NewConsumer(e.cons, platform.ConsumeConfig{Name: "settle_test", JS: e.js, Log: testenv.Logger(io.Discard), Reg: e.reg})
	c.Handle(t.Context(), e.fetch(t, 1), func(_ context.Context, batch []*platform.Delivery) error {
		batch[0].Settle(platform.DeadLetter("acme", "no"))
		return nil
	})
	if got := e.counter(t, "otpflow_deliveries_settled_total", "retry"); got != 1 {
		t.Errorf("retries %v, want 1", got)
	}
	if n := len(testenv.Messages(t, e.js, events.StreamDLQ, "")); n != 0 {
		t.Errorf("%d dead letters written without a key", n)
	}
}

// TestDeadLetterRecipients: where each kind of message names its recipient for the
// Otp-Recipient-Hash header.
func TestDeadLetterRecipients(t *testing.T) {
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subject key")
	ana := subjects.Subject("acme", "ana@example.com")
	for _, tc := range []struct {
		name string
		find func(string, []byte) string
		body string
		want string
	}{
		{"request", platform.RequestRecipient(subjects), `{"request_id":"r1","recipient":"ANA@example.com","purpose":"login"}`, ana},
		{"request with an unknown field", platform.RequestRecipient(subjects), `{"recipient":"ana@example.com","extra":1}`, ana},
		{"request without a recipient", platform.RequestRecipient(subjects), `{"request_id":"r1"}`, ""},
		{"not JSON", platform.RequestRecipient(subjects), `{"recipient":`, ""},
		{"event with a hash", platform.EventRecipient(subjects), `{"recipient_hash":"k9:abc","recipient":"ana@example.com"}`, "k9:abc"},
		{"event written before hashes", platform.EventRecipient(subjects), `{"challenge_id":"c","recipient":"ana@example.com"}`, ana},
		{"challenge (OTP_CHALLENGES)", platform.EventRecipient(subjects), `{"challenge_id":"c","recipient_hashes":["` + ana + `","k0:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]}`, ana},
		{"challenge with a malformed hash", platform.EventRecipient(subjects), `{"recipient_hashes":["ana@example.com"]}`, ""},
		{"event about nobody", platform.EventRecipient(subjects), `{"tenant":"acme","rule":"x"}`, ""},
		{"event before hashes, no key", platform.EventRecipient(nil), `{"recipient":"ana@example.com"}`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.find("acme", []byte(tc.body)); got != tc.want {
				t.Errorf("recipient %q, want %q", got, tc.want)
			}
		})
	}
}
