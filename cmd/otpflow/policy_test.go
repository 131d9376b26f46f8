package main

import (
	"encoding/json"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestPolicyAcrossThePipeline: rules that cross services, with a tenants file read by
// the issuer, the dispatcher and the verifier.
func TestPolicyAcrossThePipeline(t *testing.T) {
	w := newWorld(t)
	w.env["OTP_TENANTS_FILE"] = tenantsFile(t, `
tenants:
  acme:
    sender: "Acme Login <login@acme.example>"
    rate_limits: {recipient_cooldown: 0s}
    test_recipients:
      qa@acme.test: "424242"
`)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())

	// Supersede: the older challenge answers superseded, the newer one verifies.
	a.request(t, "acme", `{"request_id":"s1","recipient":"ana@example.com","purpose":"login"}`)
	first := codeOf(t, w.smtp.WaitFor(t, 1, 30*time.Second)[0])
	a.request(t, "acme", `{"request_id":"s2","recipient":"ana@example.com","purpose":"login"}`)
	mails := w.smtp.WaitFor(t, 2, 30*time.Second)
	second := codeOf(t, mails[1])
	if mails[1].From != "login@acme.example" {
		t.Fatalf("tenant sender not used: %q", mails[1].From)
	}
	a.supersessionOnStream(t, "acme", 1)
	if r := a.verify(t, "acme", "s1", first); r.Status != events.StatusSuperseded {
		t.Fatalf("older challenge: %+v, want superseded", r)
	}
	if r := a.verify(t, "acme", "s2", second); r.Status != events.StatusVerified {
		t.Fatalf("newer challenge: %+v", r)
	}

	// A test recipient: fixed code, never mailed, marked test.
	a.request(t, "acme", `{"request_id":"qa-1","recipient":"qa@acme.test","purpose":"login"}`)
	testenv.Eventually(t, 10*time.Second, "the test code issued", func() bool { return count(t, a.js, "otp.issued.acme") == 3 })
	if r := a.verify(t, "acme", "qa-1", "424242"); r.Status != events.StatusVerified {
		t.Fatalf("test recipient: %+v", r)
	}
	// The same address at another tenant is an ordinary recipient.
	a.request(t, "other", `{"request_id":"qa-2","recipient":"qa@acme.test","purpose":"login"}`)
	w.smtp.WaitFor(t, 3, 30*time.Second)
	if got := mailsTo(w.smtp.Mails(), "qa@acme.test"); len(got) != 1 {
		t.Fatalf("%d mails to the test address, want 1 (the other tenant's)", len(got))
	}
	testenv.Eventually(t, 10*time.Second, "events marked test", func() bool {
		var issued, verified bool
		for _, m := range testenv.Messages(t, a.js, events.StreamEvents, "otp.*.acme") {
			var e struct {
				RequestID string `json:"request_id"`
				Test      bool   `json:"test"`
			}
			_ = json.Unmarshal(m.Data, &e)
			if e.RequestID == "qa-1" && e.Test {
				issued = issued || m.Subject == "otp.issued.acme"
				verified = verified || m.Subject == "otp.verified.acme"
			}
		}
		return issued && verified
	})
}

// TestKeyRotation: codes issued under the old pepper and seal key still dispatch and
// verify after both rotated; new codes use the new keys.
func TestKeyRotation(t *testing.T) {
	w := newWorld(t)
	oldPepper, oldSeal := keys.Generate("p1", 32), keys.Generate("s1", 32)
	w.env["OTP_CODE_PEPPER"], w.env["OTP_SEAL_KEY"] = oldPepper, oldSeal
	logs := &testenv.LogBuffer{}
	// Before the rotation: the issuer runs, the dispatchers are down.
	issuer := w.startService(t, "issuer", logs)
	a := newApp(t, w.nats.ClientURL())
	a.request(t, "acme", `{"request_id":"before","recipient":"ana@example.com","purpose":"login"}`)
	testenv.Eventually(t, 30*time.Second, "the old code issued", func() bool { return count(t, a.js, "otp.issued.acme") == 1 })
	stop(t, issuer)

	// Rotate: the new keys first (active), the old ones kept for what is in flight.
	w.env["OTP_CODE_PEPPER"] = keys.Generate("p2", 32) + "," + oldPepper
	w.env["OTP_SEAL_KEY"] = keys.Generate("s2", 32) + "," + oldSeal
	for _, name := range serviceNames {
		w.startService(t, name, logs)
	}
	oldCode := codeOf(t, w.smtp.WaitFor(t, 1, 30*time.Second)[0])
	if r := a.verify(t, "acme", "before", oldCode); r.Status != events.StatusVerified {
		t.Fatalf("code issued before the rotation: %+v", r)
	}
	a.request(t, "acme", `{"request_id":"after","recipient":"bo@example.com","purpose":"login"}`)
	newCode := codeOf(t, w.smtp.WaitFor(t, 2, 30*time.Second)[1])
	if r := a.verify(t, "acme", "after", newCode); r.Status != events.StatusVerified {
		t.Fatalf("code issued after the rotation: %+v", r)
	}
	keyIDs := map[string]string{}
	for _, m := range testenv.Messages(t, a.js, events.StreamChallenges, "otp.challenge.acme") {
		var e events.Challenge
		testenv.Must(t, json.Unmarshal(m.Data, &e), "decode")
		keyIDs[e.RequestID] = e.PepperKeyID
	}
	if keyIDs["before"] != "p1" || keyIDs["after"] != "p2" {
		t.Fatalf("pepper key ids %v, want before=p1 after=p2", keyIDs)
	}
}

// stop sends SIGTERM to one service process and waits for it to exit.
func stop(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s exited with %v", cmd.Path, err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not stop", cmd.Path)
	}
}
