package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/auditor"
)

// verifyInSession asks otp.verify with the session a code is bound to.
func (a *app) verifyInSession(t *testing.T, tenant, requestID, code, session string) events.VerifyReply {
	t.Helper()
	body, _ := json.Marshal(events.VerifyRequest{RequestID: requestID, Code: code, Context: events.VerifyContext{SessionID: session}})
	msg, err := a.nc.Request("otp.verify."+tenant, body, 5*time.Second)
	testenv.Must(t, err, "verify request")
	var r events.VerifyReply
	testenv.Must(t, json.Unmarshal(msg.Data, &r), "decode reply %q", msg.Data)
	return r
}

// supersessionOnStream waits until the tenant's n-th otp.challenge_superseded is on
// OTP_CHALLENGES, not for the verifier to project it: from then on the older code must
// answer superseded, however far the projection lags (the verifier's supersession index).
func (a *app) supersessionOnStream(t *testing.T, tenant string, n int) {
	t.Helper()
	testenv.WaitMessages(t, a.js, events.StreamChallenges, events.TypeChallengeSuperseded.Subject(tenant), n, 30*time.Second)
}

// TestAuditStreamHoldsNoCodeHMACOrPlaintext: the whole pipeline, a request superseded by a
// newer one, and a session-bound code that verifies. Every OTP_EVENTS message, read back
// through NATS, holds no code HMAC, no session, no client IP and no address, and neither
// does the audit log: the verifier had all it needed from OTP_CHALLENGES.
func TestAuditStreamHoldsNoCodeHMACOrPlaintext(t *testing.T) {
	w := newWorld(t)
	w.env["OTP_TENANTS_FILE"] = tenantsFile(t, `
tenants:
  acme:
    rate_limits: {recipient_cooldown: 0s}
`)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())
	const (
		addr    = "Ana.Lima@Example.com"
		ip      = "203.0.113.77"
		session = "sess-9f2c41"
	)
	body := func(id string) string {
		return fmt.Sprintf(`{"request_id":%q,"recipient":%q,"purpose":"login","context":{"ip":%q,"session_id":%q}}`, id, addr, ip, session)
	}
	a.request(t, "acme", body("first"))
	first := codeOf(t, w.smtp.WaitFor(t, 1, 30*time.Second)[0])
	a.request(t, "acme", body("second"))
	second := codeOf(t, w.smtp.WaitFor(t, 2, 30*time.Second)[1])

	a.supersessionOnStream(t, "acme", 1)
	if r := a.verifyInSession(t, "acme", "first", first, session); r.Status != events.StatusSuperseded {
		t.Fatalf("the superseded code: %+v, want superseded", r)
	}
	if r := a.verifyInSession(t, "acme", "second", second, "another-session"); r.Status != events.StatusInvalidCode {
		t.Fatalf("the code in another session: %+v, want invalid_code", r)
	}
	if r := a.verifyInSession(t, "acme", "second", second, session); r.Status != events.StatusVerified {
		t.Fatalf("the code in its session: %+v, want verified", r)
	}
	db := openDB(t, w.db)
	testenv.Eventually(t, 30*time.Second, "the story audited", func() bool {
		return len(auditTypes(t, db, "acme", "second")) == 4 && len(auditTypes(t, db, "acme", "first")) == 4
	})

	// The verifier's stream has what it needs: the HMACs, the session, the hashes.
	challenges := testenv.Messages(t, a.js, events.StreamChallenges, "")
	var macs []string
	for _, m := range challenges {
		if typ, _, _ := events.SplitSubject(m.Subject); typ == events.TypeChallenge {
			var c events.Challenge
			testenv.Must(t, json.Unmarshal(m.Data, &c), "challenge")
			if len(c.CodeHMAC) == 0 || c.SessionID != session || len(c.RecipientHashes) != 1 {
				t.Fatalf("otp.challenge lacks what the verifier needs: %+v", c)
			}
			b, _ := json.Marshal(c.CodeHMAC)
			macs = append(macs, strings.Trim(string(b), `"`))
		}
	}
	if len(macs) != 2 || len(challenges) != 3 {
		t.Fatalf("OTP_CHALLENGES holds %d messages (%d codes), want 2 codes and 1 supersession", len(challenges), len(macs))
	}

	// The audit stream, message by message, body and headers.
	var all strings.Builder
	for _, m := range testenv.Messages(t, a.js, events.StreamEvents, "") {
		var fields map[string]json.RawMessage
		testenv.Must(t, json.Unmarshal(m.Data, &fields), "%s", m.Subject)
		for _, f := range []string{"recipient", "code_hmac", "pepper_key_id", "session_id", "client_ip"} {
			if _, ok := fields[f]; ok {
				t.Errorf("%s carries %s: %s", m.Subject, f, m.Data)
			}
		}
		fmt.Fprintf(&all, "%s %s %v\n", m.Subject, m.Data, m.Header)
	}
	stream := all.String()
	if !strings.Contains(stream, "otp.issued.acme") || !strings.Contains(stream, "A***@Example.com") {
		t.Fatalf("the audit stream lacks the issued events or their masked recipient:\n%s", stream)
	}
	testenv.AssertNoPlaintext(t, stream, append([]string{addr, ip, session}, macs...)...)
	dump, _ := testenv.DumpSchema(t, db, auditor.Schema)
	testenv.AssertNoPlaintext(t, dump, append([]string{addr, ip, session}, macs...)...)
}

// TestCodesIssuedBeforeTheUpgradeStillVerify: an otp.issued as the issuer of the earlier
// release wrote it (the address, client IP, session and code HMAC on OTP_EVENTS) is still
// projected by the verifier, so its code verifies across the upgrade, and audited without
// its plaintext; the trail finds it by address, also once the subject key has rotated.
func TestCodesIssuedBeforeTheUpgradeStillVerify(t *testing.T) {
	w := newWorld(t)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())
	pepper, err := keys.ParsePepper(w.getenv("OTP_CODE_PEPPER"))
	testenv.Must(t, err, "pepper")

	// This release's request for one person, then the earlier release's event for them.
	a.request(t, "acme", `{"request_id":"new","recipient":"bo@example.com","purpose":"login","context":{"ip":"198.51.100.9"}}`)
	newCode := codeOf(t, w.smtp.WaitFor(t, 1, 30*time.Second)[0])
	const challenge = "0f8fad5b-d9cb-469f-a165-70867728950e"
	raw, err := pepper.MAC("p1", challenge, "246813")
	testenv.Must(t, err, "mac")
	mac := base64.StdEncoding.EncodeToString(raw)
	old := fmt.Sprintf(`{"challenge_id":%q,"tenant":"acme","request_id":"before-upgrade","code_seq":1,"recipient":"Bo@Example.com",
		"purpose":"login","code_length":6,"code_hmac":%q,"pepper_key_id":"p1","max_attempts":5,"session_id":"sess-old-7",
		"client_ip":"198.51.100.9","issued_at":%q,"expires_at":%q}`, challenge, mac, time.Now().UTC().Format(time.RFC3339Nano),
		time.Now().Add(5*time.Minute).UTC().Format(time.RFC3339Nano))
	m, err := events.NewMsg(events.TypeIssued, "acme", "issued:"+challenge+":1", challenge, json.RawMessage(old), events.Envelope{Source: "otpflow/issuer"})
	testenv.Must(t, err, "msg")
	_, err = a.js.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish the earlier release's otp.issued")

	// The verifier's consumer of earlier releases, on OTP_EVENTS, has taken it.
	idle(t, a.js, events.StreamEvents, events.ConsumerVerifier)
	if r := a.verifyInSession(t, "acme", "before-upgrade", "246813", "sess-old-7"); r.Status != events.StatusVerified {
		t.Fatalf("a code issued before the upgrade: %+v, want verified", r)
	}
	if r := a.verify(t, "acme", "new", newCode); r.Status != events.StatusVerified {
		t.Fatalf("this release's code: %+v", r)
	}
	db := openDB(t, w.db)
	testenv.Eventually(t, 30*time.Second, "both audited", func() bool {
		return slices.Equal(auditTypes(t, db, "acme", "before-upgrade"), []string{"otp.issued", "otp.verified"}) &&
			len(auditTypes(t, db, "acme", "new")) == 3
	})
	dump, _ := testenv.DumpSchema(t, db, auditor.Schema)
	testenv.AssertNoPlaintext(t, dump, "bo@example.com", "198.51.100.9", "sess-old-7", mac)

	// The subject key rotates: k2 first, k1 kept. A trail by address finds both
	// requests, made under k1; a ring without k1 finds none.
	newKey := keys.Generate("k2", 32)
	with := func(ring string) func(string) string {
		return func(k string) string {
			if k == "OTP_SUBJECT_KEY" {
				return ring
			}
			return w.getenv(k)
		}
	}
	trail := func(getenv func(string) string) []auditor.Step {
		t.Helper()
		var out, errOut strings.Builder
		_, err := run(context.Background(), []string{"audit", "trail", "--db", w.db, "--tenant", "acme", "--recipient", "BO@example.com", "--json"},
			getenv, &out, &errOut)
		testenv.Must(t, err, "audit trail: %s", errOut.String())
		var steps []auditor.Step
		testenv.Must(t, json.Unmarshal([]byte(out.String()), &steps), "trail json")
		return steps
	}
	ids := map[string]bool{}
	for _, s := range trail(with(newKey + "," + w.getenv("OTP_SUBJECT_KEY"))) {
		ids[s.RequestID] = true
	}
	if len(ids) != 2 || !ids["new"] || !ids["before-upgrade"] {
		t.Fatalf("trail after the rotation found %v, want new and before-upgrade", ids)
	}
	if steps := trail(with(newKey)); len(steps) != 0 {
		t.Fatalf("a ring without the old key found %d steps", len(steps))
	}
}
