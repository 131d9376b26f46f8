package platform_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

const erasureHash = "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

// TestRunErasures: a service's erasure consumer erases and answers each well-formed
// request once per erasure, retries an erasure that failed (the database down) until it
// succeeds, and dead-letters malformed requests with their reason instead of stalling on
// them.
func TestRunErasures(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	var calls, failures atomic.Int32
	failures.Store(2)
	erase := func(_ context.Context, req events.ErasureRequested) (int64, error) {
		calls.Add(1)
		if failures.Add(-1) >= 0 {
			return 0, errors.New("database restarting")
		}
		return int64(len(req.RecipientHashes)), nil
	}
	publish := func(tenant, body string) {
		t.Helper()
		_, err := js.Publish(t.Context(), events.TypeErasureRequested.Subject(tenant), []byte(body))
		testenv.Must(t, err, "publish")
	}
	good := events.ErasureRequested{ErasureID: "5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6", Tenant: "acme",
		RecipientHashes: []string{erasureHash}, RequestedAt: time.Now().UTC()}
	body, _ := json.Marshal(good)
	publish("acme", string(body))
	publish("acme", string(body)) // the same erasure asked twice: answered under one id
	publish("globex", string(body))
	publish("acme", `{"erasure_id":"x","tenant":"acme","recipient_hashes":["k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]}`)
	publish("acme", `{"erasure_id":"5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6","tenant":"acme","recipient_hashes":["ana@example.com"]}`)
	publish("acme", `{"erasure_id":"5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6","tenant":"acme","recipient_hashes":[]}`)
	publish("acme", `not json`)

	testenv.Start(t, func(ctx context.Context) error {
		return platform.RunErasures(ctx, js, platform.ErasureConfig{Service: "issuer", Erase: erase,
			DeadLetters: &platform.DeadLetters{Sealer: testenv.DLQKey(t)}, Log: testenv.Logger(io.Discard)})
	})
	dead := testenv.WaitMessages(t, js, events.StreamDLQ, events.TypeDLQ.Wildcard(), 5, 60*time.Second)
	testenv.WaitMessages(t, js, events.StreamEvents, events.TypeErased.Wildcard(), 1, 30*time.Second)
	testenv.Eventually(t, 30*time.Second, "the consumer drained", func() bool {
		c, err := js.Consumer(t.Context(), events.StreamEvents, "issuer-erasure")
		if err != nil {
			return false
		}
		info, err := c.Info(t.Context())
		return err == nil && info.NumPending == 0 && info.NumAckPending == 0
	})
	answers := testenv.Messages(t, js, events.StreamEvents, events.TypeErased.Wildcard())
	if len(answers) != 1 {
		t.Fatalf("%d answers, want 1 (the repeat is deduplicated)", len(answers))
	}
	var e events.Erased
	testenv.Must(t, json.Unmarshal(answers[0].Data, &e), "answer")
	if e.Service != "issuer" || e.ErasureID != good.ErasureID || e.Rows != 1 || e.Tenant != "acme" {
		t.Fatalf("answer %+v", e)
	}
	if calls.Load() != 4 { // two failures, then the request and its repeat
		t.Fatalf("erase called %d times, want 4", calls.Load())
	}
	reasons := map[string]bool{}
	for _, m := range dead {
		reasons[m.Header.Get(events.HeaderDLQReason)] = true
	}
	for _, want := range []string{
		`issuer: erasure names tenant "acme" on the subject of tenant "globex"`,
		"issuer: erasure_id is not a UUID",
		"issuer: recipient_hashes holds a value that is not a subject hash",
		"issuer: erasure must name 1 to 64 recipient hashes, names 0",
	} {
		if !reasons[want] {
			t.Errorf("no dead letter with reason %q; got %v", want, reasons)
		}
	}
}

// FuzzDecodeErasure: whatever arrives on otp.erasure_requested, DecodeErasure returns a
// request that names its subject's tenant, a UUID and only subject hashes, or an error;
// it never panics.
func FuzzDecodeErasure(f *testing.F) {
	f.Add("otp.erasure_requested.acme", []byte(`{"erasure_id":"5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6","tenant":"acme","recipient_hashes":["`+erasureHash+`"]}`))
	f.Add("otp.erasure_requested.acme", []byte(`{"erasure_id":"5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6","tenant":"acme","recipient_hashes":null}`))
	f.Add("otp.erasure_requested", []byte(`{}`))
	f.Fuzz(func(t *testing.T, subject string, data []byte) {
		req, err := platform.DecodeErasure(subject, data)
		if err != nil {
			return
		}
		_, tenant, _ := events.SplitSubject(subject)
		if req.Tenant != tenant || !events.IsUUID(req.ErasureID) || len(req.RecipientHashes) == 0 {
			t.Fatalf("accepted %+v on %q", req, subject)
		}
		for _, h := range req.RecipientHashes {
			if !events.IsSubjectHash(h) {
				t.Fatalf("accepted hash %q", h)
			}
		}
	})
}
