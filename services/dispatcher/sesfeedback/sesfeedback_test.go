package sesfeedback

import (
	"encoding/json"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
)

const (
	challenge = "2eedf1ad-5135-4c42-a28f-5b09316ec196"
	keyHash   = "3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
)

var received = time.Date(2026, 12, 1, 10, 0, 3, 0, time.UTC)

// tags are the message tags the dispatcher sets, as SES reports them: a list per name,
// beside SES's own.
func tags() map[string][]string {
	return map[string][]string{"ses:configuration-set": {"otp"}, "ses:source-ip": {"192.0.2.1"},
		"tenant": {"acme"}, "purpose": {"login"}, "challenge_id": {challenge}, "code_seq": {"2"},
		"recipient_key": {"azE"}, "recipient_hash": {keyHash}}
}

// record is an SES event record of eventType with the type's own object, in the shape
// SES documents for event publishing to SNS.
func record(eventType string, own map[string]any, tags map[string][]string) map[string]any {
	r := map[string]any{"eventType": eventType, "mail": map[string]any{
		"timestamp": "2026-12-01T10:00:00.012Z", "source": "Acme <no-reply@acme.example>",
		"sourceArn": "arn:aws:ses:eu-west-1:123456789012:identity/acme.example", "sendingAccountId": "123456789012",
		"messageId": "0100018c1d2e3f40-5a6b7c8d-example-000000", "destination": []string{"ana@example.com"},
		"headersTruncated": false, "tags": tags,
	}}
	for k, v := range own {
		r[k] = v
	}
	return r
}

// viaSNS wraps a record as SQS holds an SNS notification without raw message delivery.
func viaSNS(t testing.TB, r any) []byte {
	t.Helper()
	inner, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(map[string]any{"Type": "Notification", "MessageId": "7d4f1c2a-9b3e-5f60-8a71-0c2d3e4f5a6b",
		"TopicArn": "arn:aws:sns:eu-west-1:123456789012:otp-feedback", "Message": string(inner),
		"Timestamp": "2026-12-01T10:00:02.500Z", "SignatureVersion": "1", "Signature": "EXAMPLE", "SigningCertURL": "https://sns.example/cert.pem"})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func raw(t testing.TB, r any) []byte {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var (
	bounce = map[string]any{"bounce": map[string]any{"bounceType": "Permanent", "bounceSubType": "General",
		"bouncedRecipients": []map[string]any{{"emailAddress": "ana@example.com", "action": "failed", "status": "5.1.1",
			"diagnosticCode": "smtp; 550 5.1.1 <ana@example.com>: Recipient address rejected; from 198.51.100.7"}},
		"timestamp": "2026-12-01T10:00:01.669Z", "feedbackId": "0100018c-feedback-bounce-000000", "reportingMTA": "dsn; mta.example.com"}}
	complaint = map[string]any{"complaint": map[string]any{"complainedRecipients": []map[string]any{{"emailAddress": "ana@example.com"}},
		"timestamp": "2026-12-09T08:00:00.000Z", "feedbackId": "0100018c-feedback-complaint-000000", "userAgent": "Mail UA",
		"complaintFeedbackType": "abuse", "arrivalDate": "2026-12-09T07:59:00.000Z"}}
	delivery = map[string]any{"delivery": map[string]any{"timestamp": "2026-12-01T10:00:00.900Z", "processingTimeMillis": 888,
		"recipients": []string{"ana@example.com"}, "smtpResponse": "250 2.6.0 Message received", "reportingMTA": "a8-70.smtp-out.example.com"}}
	delay = map[string]any{"deliveryDelay": map[string]any{"timestamp": "2026-12-01T10:05:00.000Z", "delayType": "MailboxFull",
		"expirationTime": "2026-12-01T22:00:00.000Z", "delayedRecipients": []map[string]any{{"emailAddress": "ana@example.com",
			"status": "4.2.2", "diagnosticCode": "smtp; 452 4.2.2 <ana@example.com> mailbox full"}}}}
	reject    = map[string]any{"reject": map[string]any{"reason": "Bad content"}}
	rendering = map[string]any{"failure": map[string]any{"errorMessage": "Attribute 'name' is not present in the rendering data.", "templateName": "otp"}}
)

// TestParseEveryKind: each event type SES publishes for a mail becomes its otp.feedback,
// tied to the code by the tags, with the recipient's subject hash, the type's details, and
// no address or IP left in the text.
func TestParseEveryKind(t *testing.T) {
	sent := time.Date(2026, 12, 1, 10, 0, 0, 12e6, time.UTC)
	for _, tc := range []struct {
		name      string
		eventType string
		own       map[string]any
		want      events.Feedback
	}{
		{"bounce", "Bounce", bounce, events.Feedback{Kind: events.FeedbackBounced, BounceType: "Permanent", BounceSubType: "General",
			Diagnostic: "5.1.1 smtp; 550 5.1.1 <address>: Recipient address rejected; from <ip>", OccurredAt: time.Date(2026, 12, 1, 10, 0, 1, 669e6, time.UTC)}},
		{"complaint", "Complaint", complaint, events.Feedback{Kind: events.FeedbackComplained, ComplaintType: "abuse",
			OccurredAt: time.Date(2026, 12, 9, 8, 0, 0, 0, time.UTC)}},
		{"delivery", "Delivery", delivery, events.Feedback{Kind: events.FeedbackMailboxDelivered, Diagnostic: "250 2.6.0 Message received",
			OccurredAt: time.Date(2026, 12, 1, 10, 0, 0, 900e6, time.UTC)}},
		{"delay", "DeliveryDelay", delay, events.Feedback{Kind: events.FeedbackDelayed, DelayType: "MailboxFull",
			Diagnostic: "4.2.2 smtp; 452 4.2.2 <address> mailbox full", OccurredAt: time.Date(2026, 12, 1, 10, 5, 0, 0, time.UTC)}},
		{"reject", "Reject", reject, events.Feedback{Kind: events.FeedbackRejected, Diagnostic: "Bad content", OccurredAt: sent}},
		{"rendering failure", "Rendering Failure", rendering, events.Feedback{Kind: events.FeedbackRejected,
			Diagnostic: "rendering failure: Attribute 'name' is not present in the rendering data.", OccurredAt: sent}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.want
			want.Tenant, want.ChallengeID, want.CodeSeq, want.RecipientHash = "acme", challenge, 2, "k1:"+keyHash // "azE" is "k1"
			want.Provider, want.ProviderMessageID, want.SentAt, want.ReceivedAt = "ses", "0100018c1d2e3f40-5a6b7c8d-example-000000", sent, received
			for _, body := range [][]byte{viaSNS(t, record(tc.eventType, tc.own, tags())), raw(t, record(tc.eventType, tc.own, tags()))} {
				n, err := Parse(body, received)
				if err != nil {
					t.Fatal(err)
				}
				if n.Event != want {
					t.Errorf("event\n got %+v\nwant %+v", n.Event, want)
				}
				if n.ID == "" || !strings.HasPrefix(n.MsgID(), "feedback:ses:") {
					t.Errorf("id %q", n.ID)
				}
				if b, _ := json.Marshal(n.Event); strings.Contains(string(b), "ana@") || strings.Contains(string(b), "198.51.100.7") {
					t.Errorf("the event quotes the address or an IP: %s", b)
				}
			}
		})
	}
}

// TestTheSameNotificationKeepsItsID: a queue message read twice gives the same event id
// (the SNS MessageId, or a raw record's feedback id), so the stream stores it once.
func TestTheSameNotificationKeepsItsID(t *testing.T) {
	a, err := Parse(viaSNS(t, record("Bounce", bounce, tags())), received)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Parse(viaSNS(t, record("Bounce", bounce, tags())), received.Add(time.Minute))
	if a.MsgID() != b.MsgID() || a.ID != "7d4f1c2a-9b3e-5f60-8a71-0c2d3e4f5a6b" {
		t.Errorf("ids %q and %q", a.MsgID(), b.MsgID())
	}
	r, _ := Parse(raw(t, record("Bounce", bounce, tags())), received)
	if r.ID != "0100018c-feedback-bounce-000000" {
		t.Errorf("raw record id %q, want its feedback id", r.ID)
	}
	d1, _ := Parse(raw(t, record("Delivery", delivery, tags())), received)
	d2, _ := Parse(raw(t, record("Delivery", delivery, tags())), received)
	if d1.ID == "" || d1.ID != d2.ID || d1.ID == r.ID {
		t.Errorf("raw delivery ids %q, %q", d1.ID, d2.ID)
	}
}

// TestRefusedNotificationsSayWhy: what Parse refuses carries a reason and quotes nothing
// of the body; the types otpflow has no use for are ignored, not refused.
func TestRefusedNotificationsSayWhy(t *testing.T) {
	noTags := tags()
	for _, k := range []string{"tenant", "challenge_id", "code_seq", "recipient_key", "recipient_hash"} {
		delete(noTags, k)
	}
	badTenant, badChallenge, badSeq, badHash, badKey := tags(), tags(), tags(), tags(), tags()
	badKey["recipient_key"] = []string{"k.1"}
	badTenant["tenant"] = []string{"acme.>"}
	badChallenge["challenge_id"] = []string{"ana@example.com"}
	badSeq["code_seq"] = []string{"0"}
	badHash["recipient_hash"] = []string{"ana@example.com"}
	for _, tc := range []struct {
		name   string
		body   []byte
		reason string
	}{
		{"not JSON", []byte("ana@example.com bounced"), ReasonMalformed},
		{"a JSON array", []byte(`[1,2]`), ReasonMalformed},
		{"an empty object", []byte(`{}`), ReasonMalformed},
		{"a subscription confirmation", []byte(`{"Type":"SubscriptionConfirmation","MessageId":"m","Message":"x"}`), ReasonNotEvent},
		{"an SNS message that is not JSON", []byte(`{"Type":"Notification","MessageId":"m","Message":"ana@example.com"}`), ReasonMalformed},
		{"an unknown type", viaSNS(t, record("Teleported", nil, tags())), ReasonUnknownType},
		{"a bounce without its object", viaSNS(t, record("Bounce", nil, tags())), ReasonMissingField},
		{"no mail", []byte(`{"eventType":"Bounce"}`), ReasonMissingField},
		{"a forged tenant", viaSNS(t, record("Bounce", bounce, badTenant)), ReasonBadTag},
		{"a challenge id that is not one", viaSNS(t, record("Bounce", bounce, badChallenge)), ReasonBadTag},
		{"a code sequence that is not one", viaSNS(t, record("Bounce", bounce, badSeq)), ReasonBadTag},
		{"a hash that is not one", viaSNS(t, record("Bounce", bounce, badHash)), ReasonBadTag},
		{"too big", []byte(`{"Type":"Notification","MessageId":"m","Message":"` + strings.Repeat("x", maxBody) + `"}`), ReasonMalformed},
		{"a recipient key that is not base64url", viaSNS(t, record("Bounce", bounce, badKey)), ReasonBadTag},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.body, received)
			var e *Error
			if !errors.As(err, &e) || e.Reason != tc.reason {
				t.Fatalf("err %v, want reason %s", err, tc.reason)
			}
			if strings.Contains(err.Error(), "ana@") || strings.Contains(err.Error(), "acme.>") {
				t.Errorf("the error quotes the body: %v", err)
			}
		})
	}
	for _, typ := range []string{"Send", "Open", "Click", "Subscription"} {
		if _, err := Parse(viaSNS(t, record(typ, nil, tags())), received); !errors.Is(err, ErrIgnored) {
			t.Errorf("%s: %v, want ErrIgnored", typ, err)
		}
	}
	if _, err := Parse([]byte(`{"eventType":"AmazonSnsSubscriptionSucceeded","subscription":{}}`), received); !errors.Is(err, ErrIgnored) {
		t.Errorf("subscription succeeded: %v, want ErrIgnored", err)
	}
	// Another sender's mail on a shared configuration set, or an identity's feedback
	// notification (no tags): dropped, not kept in OTP_DLQ with that sender's recipients.
	if _, err := Parse(viaSNS(t, record("Bounce", bounce, noTags)), received); !errors.Is(err, ErrNotOurs) {
		t.Errorf("another sender's mail: %v, want ErrNotOurs", err)
	}
}

// FuzzParse: no body makes Parse panic; whatever it accepts is a feedback event whose
// identity fields are valid and whose text names no address.
func FuzzParse(f *testing.F) {
	for _, own := range []struct {
		typ string
		v   map[string]any
	}{{"Bounce", bounce}, {"Complaint", complaint}, {"Delivery", delivery}, {"DeliveryDelay", delay}, {"Reject", reject}, {"Rendering Failure", rendering}} {
		f.Add(viaSNS(f, record(own.typ, own.v, tags())))
		f.Add(raw(f, record(own.typ, own.v, tags())))
	}
	f.Add([]byte(`{"Type":"Notification","MessageId":"m","Message":"{}"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		n, err := Parse(body, received)
		if err != nil {
			var e *Error
			if !errors.Is(err, ErrIgnored) && !errors.Is(err, ErrNotOurs) && !errors.As(err, &e) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		ev := n.Event
		switch {
		case !events.ValidTenant(ev.Tenant), !events.IsUUID(ev.ChallengeID), ev.CodeSeq < 1, !idPattern(n.ID):
			t.Fatalf("accepted an event with a bad identity: %+v (id %q)", ev, n.ID)
		case strings.Contains(ev.Diagnostic, "@") && events.RedactAddresses(ev.Diagnostic) != ev.Diagnostic:
			t.Fatalf("diagnostic names an address: %q", ev.Diagnostic)
		}
	})
}

// TestRecipientTagsRoundTrip: a subject hash goes through SES's tags (only [0-9A-Za-z_-])
// and comes back whole, whatever key id the ring uses; key ids that differ only where SES
// would replace a character stay apart.
func TestRecipientTagsRoundTrip(t *testing.T) {
	seen := map[string]string{}
	for _, id := range []string{"k1", "2026.11", "k.1", "k_1", "a-b_c.d", strings.Repeat("z", 32)} {
		hash := id + ":" + keyHash
		tg := RecipientTags(hash)
		for _, v := range tg {
			if strings.Trim(v, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-") != "" {
				t.Fatalf("%s: tag value %q holds a character SES refuses", id, v)
			}
		}
		if other, ok := seen[tg[TagRecipientKey]]; ok {
			t.Fatalf("key ids %q and %q share a tag", id, other)
		}
		seen[tg[TagRecipientKey]] = id
		all := tags()
		all[TagRecipientKey], all[TagRecipientHash] = []string{tg[TagRecipientKey]}, []string{tg[TagRecipientHash]}
		n, err := Parse(viaSNS(t, record("Bounce", bounce, all)), received)
		if err != nil {
			t.Fatal(err)
		}
		if n.Event.RecipientHash != hash {
			t.Errorf("%s: came back as %q", hash, n.Event.RecipientHash)
		}
	}
	if RecipientTags("not a hash") != nil {
		t.Error("tags for a value that is not a subject hash")
	}
}

var (
	plainLocal  = regexp.MustCompile(`^[A-Za-z0-9!#$%&'*+/=?^_{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_{|}~-]+)*$`)
	plainDomain = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$`)
)

// FuzzDiagnostic: whatever the receiving server says in a bounce, with the recipient's
// address anywhere in it, the event Parse makes of it names no address and no IP.
func FuzzDiagnostic(f *testing.F) {
	f.Add("ana", "example.com", "smtp; 550 5.1.1 <ana@example.com>: user unknown", "5.1.1")
	f.Add("a.b+c", "mx.example.org", "452 4.2.2 mailbox of a.b+c@mx.example.org full, from 198.51.100.7", "4.2.2")
	f.Add("x", "y.z", "\"x\"@y.z said no; see [2001:db8::1]", "")
	f.Fuzz(func(t *testing.T, local, domain, diag, status string) {
		// A recipient otpflow mails: a plain local part, a domain of dotted labels.
		if !plainLocal.MatchString(local) || !plainDomain.MatchString(domain) {
			return
		}
		addr := local + "@" + domain
		b := map[string]any{"bounce": map[string]any{"bounceType": "Permanent", "bounceSubType": "General", "timestamp": "2026-12-01T10:00:01Z",
			"feedbackId": "fb", "bouncedRecipients": []map[string]any{{"emailAddress": addr, "status": status,
				"diagnosticCode": diag + " " + addr}}}}
		n, err := Parse(viaSNS(t, record("Bounce", b, tags())), received)
		if err != nil {
			return // a record the parser refuses quotes nothing
		}
		out, _ := json.Marshal(n.Event)
		if strings.Contains(string(out), addr) {
			t.Fatalf("the event names %q: %s", addr, out)
		}
		if events.RedactIPs(n.Event.Diagnostic) != n.Event.Diagnostic {
			t.Fatalf("the diagnostic names an IP: %q", n.Event.Diagnostic)
		}
	})
}
