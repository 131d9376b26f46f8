package auditor

import (
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"
)

// rowCases are events as producers of this and later releases write them: every known
// type, a known type with fields this auditor does not know, and a type it does not know.
var rowCases = []struct {
	name, subject, body string
}{
	{"issued", "otp.issued.acme", `{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","tenant":"acme","request_id":"r-1","code_seq":1,"recipient":"Ana@Example.com","purpose":"login","code_length":6,"code_hmac":"CQk=","pepper_key_id":"p1","max_attempts":5,"session_id":"s-1","client_ip":"203.0.113.7","issued_at":"2026-11-26T10:02:00Z","expires_at":"2026-11-26T10:07:00Z","requested_at":"2026-11-26T10:01:59.5Z","risk":["recipient_burst"],"test":true}`},
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
	{"unknown type", "otp.feedback.acme", `{"challenge_id":"c-3","request_id":"r-3","recipient":"bo@example.com","client_ip":"198.51.100.1","kind":"complaint","score":0.1,"at":"2026-11-26T10:08:00Z"}`},
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
		r, err := ToRow(testKey, uint64(i+1), stored, tc.subject, header, []byte(tc.body))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		h, err := rowHash(prev, &r)
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
	`issued|r-1|2eedf1ad-5135-4c42-a28f-5b09316ec196|A***@Example.com|201908ccde6e450399f30f7c8f1dfa5da72101cc41d1c864edb92895e2c48cd8|{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","code_hmac":"CQk=","code_length":6,"code_seq":1,"expires_at":"2026-11-26T10:07:00Z","issued_at":"2026-11-26T10:02:00Z","max_attempts":5,"pepper_key_id":"p1","purpose":"login","request_id":"r-1","requested_at":"2026-11-26T10:01:59.5Z","risk":["recipient_burst"],"tenant":"acme","test":true}|map[client_ip:203.0.113.7 session_id:s-1]|a0a6d3201648018fe7d872a6d75e36f83fa2357c21442096a7e2fb9b8ecd0a3d`,
	`rejected|r-2||||{"detail":"recipient cooldown limit","limit":"recipient_cooldown","reason":"rate_limited","rejected_at":"2026-11-26T10:02:00Z","request_id":"r-2","request_seq":42,"retry_after_seconds":30,"tenant":"acme"}|map[]|24edc03107f21c6bcd48bb79a6673dc37e1ad5a80d66ff3f3e08bc994a47efa9`,
	`superseded|r-1|c-1|||{"challenge_id":"c-1","request_id":"r-1","superseded_at":"2026-11-26T10:03:00Z","superseded_by":"r-3","tenant":"acme"}|map[]|c39f1b0d143d7f13d7ab3a28e7dbac5aaceb2ab2be85b1c37a3ceb572f54e6ab`,
	`delivered|r-1|c-1|||{"attempts":1,"challenge_id":"c-1","code_seq":1,"delivered_at":"2026-11-26T10:02:02Z","provider":"smtp","provider_attempts":[{"at":"2026-11-26T10:02:01Z","outcome":"transient","provider":"ses"},{"at":"2026-11-26T10:02:02Z","outcome":"ok","provider":"smtp"}],"provider_message_id":"\u003c1@acme\u003e","request_id":"r-1","tenant":"acme","unconfirmed":true}|map[]|648a15d99ef19feccc43d4bf8c724dffa4f7ce7df34a6f9235d705f88e6d0009`,
	`delivery_failed|r-1|c-1|||{"attempts":3,"challenge_id":"c-1","code_seq":2,"failed_at":"2026-11-26T10:04:00Z","permanent":true,"provider":"ses","reason":"550 \u003caddress\u003e","request_id":"r-1","tenant":"acme"}|map[]|1a3308117e21b2a9fc3258ef4eeb6596ae5a2c76a328bcfb93c2060a34f3fc9e`,
	`dispatch_expired|r-1|c-1|||{"attempts":4,"challenge_id":"c-1","code_seq":2,"expired_at":"2026-11-26T10:07:01Z","expires_at":"2026-11-26T10:07:00Z","request_id":"r-1","tenant":"acme"}|map[]|d6b149b3be889e9f99bdfb1ec4cf2d74f0b3e412f6ef110e782353864f9cc45c`,
	`verify_failed|r-1|c-1|||{"attempts":3,"attempts_remaining":0,"challenge_id":"c-1","failed_at":"2026-11-26T10:05:00Z","reason":"recipient_failures","request_id":"r-1","status":"locked","tenant":"acme"}|map[]|3a95564f301e4465a8bea2e2bbd4d6beded0ff1b9709404e2484ad597759d327`,
	`verified|r-1|c-1|||{"attempts":2,"challenge_id":"c-1","code_seq":1,"request_id":"r-1","tenant":"acme","verified_at":"2026-11-26T10:05:00Z"}|map[]|f187fe9855c33283b35b21af9b11f2b99f92232c6d0217ed0cb03b8cf39d40b8`,
	`locked|r-1|c-1|||{"attempts":5,"challenge_id":"c-1","locked_at":"2026-11-26T10:06:00Z","request_id":"r-1","tenant":"acme"}|map[]|6d54b2276382833865134b0025dde8c73294b21c54082681b69fd97248f72f3d`,
	`alert|||||{"detail":"provider ses failed 3 of 4 calls","raised_at":"2026-11-26T10:06:00Z","rule":"delivery_failure_ratio","severity":"warning","tenant":"_system","threshold":0.5,"value":0.75}|map[]|8d9d2454cd80fff9c215f6bee13fb812eaca0c3e657be9045dd02a41508b74c2`,
	`known type, unknown fields|r-2|c-2|||{"attempts":1,"big":12345678901234567890,"challenge_id":"c-2","code_seq":1,"method":"passkey","nested":{"a":null,"b":[1,2.5,"x"]},"request_id":"r-2","tenant":"acme","verified_at":"2026-11-26T10:05:00Z"}|map[]|7efe527152a066fbefecfc334e06363056456567b824f698023f165fd0972291`,
	`unknown type|r-3|c-3|b***@example.com|d36bcebfc50a4c63a21160b2b404dd04e58ae25b96c6fbf6adc5abee89235bb6|{"at":"2026-11-26T10:08:00Z","challenge_id":"c-3","kind":"complaint","request_id":"r-3","score":0.1}|map[client_ip:198.51.100.1]|3df75dd7d5a6df0aa57da7fea4c085fc6b6811c62e7d394b9f040b3fa47f02bc`,
}
