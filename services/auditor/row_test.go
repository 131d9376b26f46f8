package auditor

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
)

// rowCases are events as producers of earlier, this and later releases write them: every known
// type, a known type with fields this auditor does not know, and a type it does not know.
var rowCases = []struct {
	name, subject, body string
}{
	{"issued", "otp.issued.acme", `{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","tenant":"acme","request_id":"r-1","code_seq":1,"recipient_hash":"k1:3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","recipient_masked":"A***@Example.com","client_hash":"k1:q83vEjRWeJAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","purpose":"login","code_length":6,"max_attempts":5,"issued_at":"2026-11-26T10:02:00Z","expires_at":"2026-11-26T10:07:00Z","requested_at":"2026-11-26T10:01:59.5Z","risk":["recipient_burst"],"test":true}`},
	// As issuers before this release wrote it: the plaintext goes, hashed; the HMAC and
	// the session go.
	{"issued, earlier release", "otp.issued.acme", `{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","tenant":"acme","request_id":"r-1","code_seq":1,"recipient":"Ana@Example.com","purpose":"login","code_length":6,"code_hmac":"CQk=","pepper_key_id":"p1","max_attempts":5,"session_id":"s-1","client_ip":"203.0.113.7","issued_at":"2026-11-26T10:02:00Z","expires_at":"2026-11-26T10:07:00Z","requested_at":"2026-11-26T10:01:59.5Z","risk":["recipient_burst"],"test":true}`},
	{"rejected", "otp.rejected.acme", `{"tenant":"acme","request_id":"r-2","reason":"rate_limited","detail":"recipient cooldown limit","retry_after_seconds":30,"limit":"recipient_cooldown","request_seq":42,"rejected_at":"2026-11-26T10:02:00Z"}`},
	{"superseded", "otp.superseded.acme", `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","superseded_by":"r-3","superseded_at":"2026-11-26T10:03:00Z"}`},
	{"delivered", "otp.delivered.acme", `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","code_seq":1,"provider":"smtp","provider_message_id":"<1@acme>","attempts":1,"unconfirmed":true,"provider_attempts":[{"provider":"ses","outcome":"transient","at":"2026-11-26T10:02:01Z"},{"provider":"smtp","outcome":"ok","at":"2026-11-26T10:02:02Z"}],"delivered_at":"2026-11-26T10:02:02Z"}`},
	{"delivery_failed", "otp.delivery_failed.acme", `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","code_seq":2,"provider":"ses","reason":"550 <address>","permanent":true,"attempts":3,"failed_at":"2026-11-26T10:04:00Z"}`},
	{"dispatch_expired", "otp.dispatch_expired.acme", `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","code_seq":2,"attempts":4,"expires_at":"2026-11-26T10:07:00Z","expired_at":"2026-11-26T10:07:01Z"}`},
	{"verify_failed", "otp.verify_failed.acme", `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","status":"locked","attempts":3,"attempts_remaining":0,"failed_at":"2026-11-26T10:05:00Z","reason":"recipient_failures"}`},
	{"verified", "otp.verified.acme", `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","code_seq":1,"attempts":2,"verified_at":"2026-11-26T10:05:00Z"}`},
	{"locked", "otp.locked.acme", `{"challenge_id":"c-1","tenant":"acme","request_id":"r-1","attempts":5,"locked_at":"2026-11-26T10:06:00Z"}`},
	{"alert", "otp.alert._system", `{"tenant":"_system","rule":"delivery_failure_ratio","severity":"warning","detail":"provider ses failed 3 of 4 calls","value":0.75,"threshold":0.5,"raised_at":"2026-11-26T10:06:00Z"}`},
	{"known type, unknown fields", "otp.verified.acme", `{"challenge_id":"c-2","tenant":"acme","request_id":"r-2","code_seq":1,"attempts":1,"verified_at":"2026-11-26T10:05:00Z","method":"passkey","big":12345678901234567890,"nested":{"b":[1,2.50,"x"],"a":null}}`},
	{"unknown type", "otp.opened.acme", `{"challenge_id":"c-3","request_id":"r-3","recipient":"bo@example.com","client_ip":"198.51.100.1","kind":"complaint","score":0.1,"at":"2026-11-26T10:08:00Z"}`},
}

// TestRowFormatIsStable pins the audit row of each case: its payload and the chain hashes.
// Integers keep every digit (an unknown field's "big" would lose some as a float64); other
// numbers keep the form jsonb gives back ("2.50" is stored as 2.5).
// A change here changes the rows a replay writes and breaks the comparison of a replayed
// log with one written before the change.
func TestRowFormatIsStable(t *testing.T) {
	stored := time.Date(2026, 11, 26, 10, 9, 0, 0, time.UTC)
	prev := make([]byte, 32) // every case hashed after the same head, so one changes alone
	var got []string
	for i, tc := range rowCases {
		header := map[string][]string{"Ce-Id": {fmt.Sprintf("e-%d", i)}, "Ce-Source": {"test"}}
		if i%2 == 0 {
			header["Ce-Time"] = []string{"2026-11-26T10:02:00.123456789Z"}
		}
		r, err := ToRow(testKey, testSubjects, uint64(i+1), stored, tc.subject, header, []byte(tc.body))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		h, err := rowHash(testChain.ring.Key("c1"), prev, &r)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got = append(got, fmt.Sprintf("%s|%s|%s|%s|%s|%s|%v|%s", tc.name, r.RequestID, r.ChallengeID, r.RecipientMasked,
			hex.EncodeToString(r.RecipientHash), r.Payload, r.PII, hex.EncodeToString(h)))
	}
	if g, w := strings.Join(got, "\n"), strings.Join(rowFormat, "\n"); g != w {
		t.Fatalf("audit rows changed:\n got:\n%s\nwant:\n%s", g, w)
	}
}

// rowFormat is what TestRowFormatIsStable expects: name|request|challenge|masked|recipient hash|payload|pii|row hash.
var rowFormat = []string{
	`issued|r-1|2eedf1ad-5135-4c42-a28f-5b09316ec196|A***@Example.com|6b313a3371322d377741414141414141414141414141414141414141414141414141414141414141414141414141|{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","code_length":6,"code_seq":1,"expires_at":"2026-11-26T10:07:00Z","issued_at":"2026-11-26T10:02:00Z","max_attempts":5,"purpose":"login","request_id":"r-1","requested_at":"2026-11-26T10:01:59.5Z","risk":["recipient_burst"],"tenant":"acme","test":true}|map[client_hash:k1:q83vEjRWeJAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA]|d3ab6451dfee27b8479d9106162a1a72b89e269190b75589c3a48511f83e827c`,
	`issued, earlier release|r-1|2eedf1ad-5135-4c42-a28f-5b09316ec196|A***@Example.com|6b313a565334654778324c6532645846564b6a5261584679344479647743477a4e4c495750746e616e304a5f3841|{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","code_length":6,"code_seq":1,"expires_at":"2026-11-26T10:07:00Z","issued_at":"2026-11-26T10:02:00Z","max_attempts":5,"purpose":"login","request_id":"r-1","requested_at":"2026-11-26T10:01:59.5Z","risk":["recipient_burst"],"tenant":"acme","test":true}|map[client_hash:k1:M2eaa5aQ-ssBKZIRtlEhVEEXH_FmnOy7wECUGAF290Q]|87fa12995a5b18d02d60a0f0abdeb2daf16765228dd7821d8d76e143a2a9d2eb`,
	`rejected|r-2||||{"detail":"recipient cooldown limit","limit":"recipient_cooldown","reason":"rate_limited","rejected_at":"2026-11-26T10:02:00Z","request_id":"r-2","request_seq":42,"retry_after_seconds":30,"tenant":"acme"}|map[]|e0fb9743ad4ab13e5c2bf6638a87120e71da55e618e667a58c881705fe6ce1eb`,
	`superseded|r-1|c-1|||{"challenge_id":"c-1","request_id":"r-1","superseded_at":"2026-11-26T10:03:00Z","superseded_by":"r-3","tenant":"acme"}|map[]|2008cea20fd48081df32a9df490d1f0cacbe9e809837965cde2aa6fc4a0344c7`,
	`delivered|r-1|c-1|||{"attempts":1,"challenge_id":"c-1","code_seq":1,"delivered_at":"2026-11-26T10:02:02Z","provider":"smtp","provider_attempts":[{"at":"2026-11-26T10:02:01Z","outcome":"transient","provider":"ses"},{"at":"2026-11-26T10:02:02Z","outcome":"ok","provider":"smtp"}],"provider_message_id":"\u003c1@acme\u003e","request_id":"r-1","tenant":"acme","unconfirmed":true}|map[]|10ba2d88dacd6015af03146bf71841c7c48153784094354dfb7e505cbb242c6f`,
	`delivery_failed|r-1|c-1|||{"attempts":3,"challenge_id":"c-1","code_seq":2,"failed_at":"2026-11-26T10:04:00Z","permanent":true,"provider":"ses","reason":"550 \u003caddress\u003e","request_id":"r-1","tenant":"acme"}|map[]|d68dbe5f758d51371df74823a1726d2fadd177048fab669286479faffb9bd45c`,
	`dispatch_expired|r-1|c-1|||{"attempts":4,"challenge_id":"c-1","code_seq":2,"expired_at":"2026-11-26T10:07:01Z","expires_at":"2026-11-26T10:07:00Z","request_id":"r-1","tenant":"acme"}|map[]|2745d7ecc7f3a669f5b6194cb7f01cd44d58d352f9ffab9a9321b14593101ba7`,
	`verify_failed|r-1|c-1|||{"attempts":3,"attempts_remaining":0,"challenge_id":"c-1","failed_at":"2026-11-26T10:05:00Z","reason":"recipient_failures","request_id":"r-1","status":"locked","tenant":"acme"}|map[]|85bac8720b887f577013068c0a8e0f19dbb968a18d5cfc4be434d8666f7017c5`,
	`verified|r-1|c-1|||{"attempts":2,"challenge_id":"c-1","code_seq":1,"request_id":"r-1","tenant":"acme","verified_at":"2026-11-26T10:05:00Z"}|map[]|28adcf20d8487f21da4ac34a167d9d658692a06b3493446e7da7300fa1cc4c9a`,
	`locked|r-1|c-1|||{"attempts":5,"challenge_id":"c-1","locked_at":"2026-11-26T10:06:00Z","request_id":"r-1","tenant":"acme"}|map[]|cd0d1a3fd2edbe1837674710ca9d1c04978c1dc67693f2601689e3d734bf5592`,
	`alert|||||{"detail":"provider ses failed 3 of 4 calls","raised_at":"2026-11-26T10:06:00Z","rule":"delivery_failure_ratio","severity":"warning","tenant":"_system","threshold":0.5,"value":0.75}|map[]|bfd9ad643c31352984d57d6c1ca534b965246a8b0e2a23463396bc6a30582506`,
	`known type, unknown fields|r-2|c-2|||{"attempts":1,"big":12345678901234567890,"challenge_id":"c-2","code_seq":1,"method":"passkey","nested":{"a":null,"b":[1,2.5,"x"]},"request_id":"r-2","tenant":"acme","verified_at":"2026-11-26T10:05:00Z"}|map[]|4e551ed358929cc098a268cce53762d9e9a3e36473aa376b6876ddb9cc095180`,
	`unknown type|r-3|c-3|b***@example.com|6b313a68615464444c734e39474157586f2d374b68676e58307a694a506c5f7236524a36754e2d56346c69665930|{"at":"2026-11-26T10:08:00Z","challenge_id":"c-3","kind":"complaint","request_id":"r-3","score":0.1}|map[client_hash:k1:2PUWoJq0JF93h9q7vCD5PhFMS-jLa2FD-6PGL-uXJzw]|430a3acf6dc913fa8e7609414f7435747ad964de454bbd4a1186c56b86d7e7d2`,
}

// FuzzToRow holds ToRow to what the chain relies on, for any message body: no panic;
// storedBody refuses a body exactly when the two decodes it made before refuse it
// (events.DecodeEvent, then the decode that keeps integers); and the payload of a row is
// already canonical, so rowContent may hash it without encoding it again.
func FuzzToRow(f *testing.F) {
	for _, tc := range rowCases {
		f.Add(tc.subject, tc.body)
	}
	for _, body := range []string{`{"a":1} `, "{\"a\":1}\n\t\r", `{"a":1} x`, `{"a":1}{"b":2}`, `{"a":1}` + "\f", `null`, `[1]`, `"x"`,
		``, ` `, `{"b":1e400}`, `{"b":-0.0,"c":1E2,"d":0.1e-7}`, `{"x":"<&>\u2028","y":"\ud800"}`, "{\"z\":\"\xff\"}",
		`{"A":{"c":1,"b":[{"z":1,"a":2}]},"a":true}`, `{"request_id":1,"Request_Id":"x"}`} {
		f.Add("otp.verified.acme", body)
	}
	f.Fuzz(func(t *testing.T, subject, body string) {
		_, err := storedBody([]byte(body))
		if werr := twoDecodes([]byte(body)); (err == nil) != (werr == nil) {
			t.Fatalf("storedBody(%q): %v; the two decodes: %v", body, err, werr)
		}
		r, err := ToRow(testKey, testSubjects, 7, time.Unix(0, 0), subject, nil, []byte(body))
		if err != nil {
			return
		}
		if !r.payloadCanonical {
			t.Fatalf("ToRow(%q) did not mark its payload canonical", body)
		}
		c, err := canonical(r.Payload)
		if err != nil {
			t.Fatalf("payload %s: %v", r.Payload, err)
		}
		if string(c) != string(r.Payload) {
			t.Fatalf("payload %s is not canonical: %s", r.Payload, c)
		}
	})
}

// twoDecodes is how storedBody decided a body was one JSON object before it decoded it
// once: events.DecodeEvent into a map, then the decode that keeps integers.
func twoDecodes(data []byte) error {
	var check map[string]json.RawMessage
	if err := events.DecodeEvent(data, &check); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var body map[string]any
	return dec.Decode(&body)
}

// TestTooLargeBodyIsRefusedAsTooLarge: the one-decode path still gives the size limit's
// reason.
func TestTooLargeBodyIsRefusedAsTooLarge(t *testing.T) {
	body := `{"pad":"` + strings.Repeat("x", events.MaxEventSize) + `"}`
	_, err := ToRow(testKey, testSubjects, 1, time.Unix(0, 0), "otp.verified.acme", nil, []byte(body))
	var v *events.ValidationError
	if !errors.As(err, &v) || v.Reason != events.ReasonTooLarge {
		t.Fatalf("got %v, want a %s validation error", err, events.ReasonTooLarge)
	}
}

// BenchmarkToRow is the auditor's per-event work before PostgreSQL: an otp.issued and an
// otp.delivered made into rows and chained (ToRow and rowHash), as a batch does.
func BenchmarkToRow(b *testing.B) {
	var issued, delivered string
	for _, tc := range rowCases {
		switch tc.name {
		case "issued":
			issued = tc.body
		case "delivered":
			delivered = tc.body
		}
	}
	header := map[string][]string{"Ce-Id": {"e-1"}, "Ce-Source": {"bench"}, "Ce-Time": {"2026-11-26T10:02:00.123456789Z"}}
	stored := time.Date(2026, 11, 26, 10, 9, 0, 0, time.UTC)
	key, prev := testChain.ring.Key("c1"), make([]byte, 32)
	b.SetBytes(int64(len(issued) + len(delivered)))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		for _, ev := range [...]struct{ subject, body string }{{"otp.issued.acme", issued}, {"otp.delivered.acme", delivered}} {
			r, err := ToRow(testKey, testSubjects, uint64(i+1), stored, ev.subject, header, []byte(ev.body))
			if err != nil {
				b.Fatal(err)
			}
			if prev, err = rowHash(key, prev, &r); err != nil {
				b.Fatal(err)
			}
		}
	}
}
