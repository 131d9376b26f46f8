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
	`issued|r-1|2eedf1ad-5135-4c42-a28f-5b09316ec196|A***@Example.com|201908ccde6e450399f30f7c8f1dfa5da72101cc41d1c864edb92895e2c48cd8|{"challenge_id":"2eedf1ad-5135-4c42-a28f-5b09316ec196","code_hmac":"CQk=","code_length":6,"code_seq":1,"expires_at":"2026-11-26T10:07:00Z","issued_at":"2026-11-26T10:02:00Z","max_attempts":5,"pepper_key_id":"p1","purpose":"login","request_id":"r-1","requested_at":"2026-11-26T10:01:59.5Z","risk":["recipient_burst"],"tenant":"acme","test":true}|map[client_ip:203.0.113.7 session_id:s-1]|4de7733b490ef5793e62735585a359fef25bc6c3e233facc5c24c8707fa61476`,
	`rejected|r-2||||{"detail":"recipient cooldown limit","limit":"recipient_cooldown","reason":"rate_limited","rejected_at":"2026-11-26T10:02:00Z","request_id":"r-2","request_seq":42,"retry_after_seconds":30,"tenant":"acme"}|map[]|5213aabf54f54dad75398e497e49ec6deb6ab83e8d3a2bb9546f1c73b3efb84b`,
	`superseded|r-1|c-1|||{"challenge_id":"c-1","request_id":"r-1","superseded_at":"2026-11-26T10:03:00Z","superseded_by":"r-3","tenant":"acme"}|map[]|ec8c293ae1cfb12c23c319861bc1401c466c90964024c468eddcd61d4f30235f`,
	`delivered|r-1|c-1|||{"attempts":1,"challenge_id":"c-1","code_seq":1,"delivered_at":"2026-11-26T10:02:02Z","provider":"smtp","provider_attempts":[{"at":"2026-11-26T10:02:01Z","outcome":"transient","provider":"ses"},{"at":"2026-11-26T10:02:02Z","outcome":"ok","provider":"smtp"}],"provider_message_id":"\u003c1@acme\u003e","request_id":"r-1","tenant":"acme","unconfirmed":true}|map[]|60d0bada7601325d2e18e921da88d21d4956f6bb1677fae6197a84d63c4f9ca3`,
	`delivery_failed|r-1|c-1|||{"attempts":3,"challenge_id":"c-1","code_seq":2,"failed_at":"2026-11-26T10:04:00Z","permanent":true,"provider":"ses","reason":"550 \u003caddress\u003e","request_id":"r-1","tenant":"acme"}|map[]|728c1df6f671d23e835e3816f836044905b467205f6905814199498699e42c08`,
	`dispatch_expired|r-1|c-1|||{"attempts":4,"challenge_id":"c-1","code_seq":2,"expired_at":"2026-11-26T10:07:01Z","expires_at":"2026-11-26T10:07:00Z","request_id":"r-1","tenant":"acme"}|map[]|f7e8a6e36f8de2bb13f48e47723d43f07df51a6662bab26d5dd932f7df7c6f56`,
	`verify_failed|r-1|c-1|||{"attempts":3,"attempts_remaining":0,"challenge_id":"c-1","failed_at":"2026-11-26T10:05:00Z","reason":"recipient_failures","request_id":"r-1","status":"locked","tenant":"acme"}|map[]|87592ecf23b91aec40f1d0ff93a8969dfc6ca012c79e3156fad6a13e48eaafc4`,
	`verified|r-1|c-1|||{"attempts":2,"challenge_id":"c-1","code_seq":1,"request_id":"r-1","tenant":"acme","verified_at":"2026-11-26T10:05:00Z"}|map[]|a7e068b63d5d0ecdbabe113c40357d950c0bf7eb63e507ab7404088e12666591`,
	`locked|r-1|c-1|||{"attempts":5,"challenge_id":"c-1","locked_at":"2026-11-26T10:06:00Z","request_id":"r-1","tenant":"acme"}|map[]|c0c6f59fdb53c524a56c9e768b3899423a44b942d58383e86acdd921cfd96419`,
	`alert|||||{"detail":"provider ses failed 3 of 4 calls","raised_at":"2026-11-26T10:06:00Z","rule":"delivery_failure_ratio","severity":"warning","tenant":"_system","threshold":0.5,"value":0.75}|map[]|559dc14e03fb8562fbc922dd8dec9cb8a96c4132228e93b8fbc3fc588ef509e3`,
	`known type, unknown fields|r-2|c-2|||{"attempts":1,"big":12345678901234567890,"challenge_id":"c-2","code_seq":1,"method":"passkey","nested":{"a":null,"b":[1,2.5,"x"]},"request_id":"r-2","tenant":"acme","verified_at":"2026-11-26T10:05:00Z"}|map[]|44e5df47230aaeb40ced3589dddbf3bfb6f0e49f69efee32fed8f8d658b54616`,
	`unknown type|r-3|c-3|b***@example.com|d36bcebfc50a4c63a21160b2b404dd04e58ae25b96c6fbf6adc5abee89235bb6|{"at":"2026-11-26T10:08:00Z","challenge_id":"c-3","kind":"complaint","request_id":"r-3","score":0.1}|map[client_ip:198.51.100.1]|3eb29b2e6ae17cb2aaebe5cd71095f9faf8335e6f8af1e7a94b1eb2a31456baa`,
}
