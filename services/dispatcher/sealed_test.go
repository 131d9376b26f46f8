package dispatcher

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestEditedAndOldFormatJobsAreRefused plays an insider who can write OTP_DISPATCH but
// holds no seal key. Each edit of a genuine job (its recipient, code_seq or expiry, by
// flipping ciphertext bits where GCM without authentication would let them through; its
// tenant; plaintext fields beside the seal) and a job in the unsealed format of earlier
// releases goes to OTP_DLQ with a reason, and nothing is mailed.
func TestEditedAndOldFormatJobsAreRefused(t *testing.T) {
	h := newHarness(t)
	const ch = "99999999-9999-4999-8999-999999999999"
	at := time.Now().UTC().Truncate(time.Second)
	job := events.DispatchJob{ChallengeID: ch, Tenant: "acme", RequestID: "h-1", CodeSeq: 1, Recipient: "victim@example.com",
		Purpose: "login", Locale: "en", IssuedAt: at, ExpiresAt: at.Add(5 * time.Minute), Code: "493027"}
	sealed, err := h.sealer.SealJob(job)
	testenv.Must(t, err, "seal")
	plain, _ := json.Marshal(job)

	// flip rewrites the ciphertext under the bytes old of the plaintext into new: what a
	// stream cipher without authentication would decrypt as new.
	flip := func(old, new string) []byte {
		i := bytes.Index(plain, []byte(old))
		if i < 0 || len(old) != len(new) {
			t.Fatalf("cannot place %q in %s", old, plain)
		}
		out := append([]byte(nil), sealed.Sealed...)
		for k := range len(old) {
			out[12+i+k] ^= old[k] ^ new[k] // after the 12-byte nonce
		}
		return out
	}
	wire := func(d events.SealedDispatch) []byte { b, _ := json.Marshal(d); return b }
	edited := func(sealedBytes []byte) []byte { d := sealed; d.Sealed = sealedBytes; return wire(d) }
	type attack struct {
		name, subject string
		body          []byte
	}
	oldFormat, _ := json.Marshal(map[string]any{"challenge_id": ch, "tenant": "acme", "request_id": "h-1", "code_seq": 1,
		"recipient": "attacker@example.com", "purpose": "login", "issued_at": at, "expires_at": at.Add(time.Hour),
		"seal_key_id": sealed.SealKeyID, "sealed_code": sealed.Sealed})
	var beside map[string]any
	_ = json.Unmarshal(wire(sealed), &beside)
	beside["recipient"], beside["code_seq"], beside["expires_at"] = "attacker@example.com", 2, at.Add(time.Hour)
	besideBody, _ := json.Marshal(beside)
	other := sealed
	other.Tenant = "other"
	attacks := []attack{
		{"recipient rewritten in the ciphertext", "otp.dispatch.acme", edited(flip(`"victim@example.com"`, `"attack@example.com"`))},
		{"code_seq rewritten in the ciphertext", "otp.dispatch.acme", edited(flip(`"code_seq":1`, `"code_seq":7`))},
		{"expiry moved in the ciphertext", "otp.dispatch.acme", edited(flip(job.ExpiresAt.Format("15:04"), job.ExpiresAt.Add(time.Hour).Format("15:04")))},
		{"moved to another tenant", "otp.dispatch.other", wire(other)},
		{"moved to another tenant's subject only", "otp.dispatch.other", wire(sealed)},
		{"plaintext fields beside the seal", "otp.dispatch.acme", besideBody},
		{"the unsealed format of earlier releases", "otp.dispatch.acme", oldFormat},
	}
	for _, a := range attacks {
		m := nats.NewMsg(a.subject)
		m.Data = a.body
		_, err := h.js.PublishMsg(context.Background(), m)
		testenv.Must(t, err, "publish %s", a.name)
	}
	dl := testenv.WaitMessages(t, h.js, events.StreamDLQ, "", len(attacks), 15*time.Second)
	for i, m := range dl {
		if r := m.Header.Get(events.HeaderDLQReason); !strings.HasPrefix(r, events.ConsumerDispatcher+": refused dispatch job: ") {
			t.Errorf("%s: DLQ reason %q", attacks[i].name, r)
		}
	}
	// The genuine job, published after the forgeries, is mailed: the consumer went past
	// all of them, and the only mail is the genuine one, to the challenge's address.
	h.publishJob(t, job, "dispatch:"+ch+":1")
	mails := h.smtp.WaitFor(t, 1, 10*time.Second)
	testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", 1, 10*time.Second)
	if len(mails) != 1 || mails[0].To[0] != "victim@example.com" {
		t.Fatalf("mails: %+v", mails)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "")); n != len(attacks) {
		t.Fatalf("%d dead letters, want %d", n, len(attacks))
	}
}

// TestNoMailIsHandedOverAfterTheCodeExpired: a provider that takes longer to answer than
// the code has left must not be handed the mail after the code expired. The send's
// deadline is the code's expiry less the margin, read on the database clock at the claim.
func TestNoMailIsHandedOverAfterTheCodeExpired(t *testing.T) {
	h := newHarness(t)
	// The relay answers RCPT TO after 6 s; the code lives 5 s from now.
	var asked atomic.Int32
	h.smtp.SetReject(func(string) error { asked.Add(1); time.Sleep(6 * time.Second); return nil })
	const ch = "abababab-abab-4bab-8bab-abababababab"
	expires := time.Now().Add(5 * time.Second).UTC()
	h.publishJob(t, events.DispatchJob{ChallengeID: ch, Tenant: "acme", RequestID: "slow", CodeSeq: 1, Recipient: "ana@example.com",
		Purpose: "login", Locale: "en", IssuedAt: expires.Add(-time.Minute), ExpiresAt: expires, Code: "123456"}, "dispatch:slow:1")
	ended := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.*.acme", 1, 30*time.Second)
	if typ := ended[0].Subject; typ != "otp.dispatch_expired.acme" && typ != "otp.delivery_failed.acme" {
		t.Fatalf("the job ended as %s, want unsent", typ)
	}
	// Every connection the dispatcher opened is closed: had the mail been handed over,
	// the relay would hold it by now.
	testenv.Eventually(t, 20*time.Second, "the relay saw the dispatcher try and leave", func() bool {
		return asked.Load() > 0 && h.smtp.Open() == 0
	})
	for _, m := range h.smtp.Mails() {
		t.Errorf("mail handed over at %v, %v after its code expired", m.At, m.At.Sub(expires))
	}
}
