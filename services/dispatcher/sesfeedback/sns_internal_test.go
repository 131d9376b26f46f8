package sesfeedback

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// TestStringToSign: the string SNS signs for a Notification, as AWS documents it: the
// name and the value of Message, MessageId, Subject (only when present), Timestamp,
// TopicArn and Type, each on a line of its own, in that order, with a newline after the
// last; the values as JSON decodes them (the Message with its own newlines and quotes).
func TestStringToSign(t *testing.T) {
	subject, empty := "Amazon SES Email Event Notification", ""
	base := snsEnvelope{Type: "Notification", MessageID: "7d4f1c2a-9b3e-5f60-8a71-0c2d3e4f5a6b",
		TopicArn: "arn:aws:sns:eu-west-1:123456789012:otp-feedback", Message: "{\"eventType\":\"Delivery\",\n\"x\":1}",
		Timestamp: "2026-12-01T10:00:02.500Z", SignatureVersion: "2", Signature: "c2ln", SigningCertURL: "https://sns.eu-west-1.amazonaws.com/a.pem"}
	withSubject, emptySubject := base, base
	withSubject.Subject, emptySubject.Subject = &subject, &empty
	for _, tc := range []struct {
		name string
		env  snsEnvelope
		want string
	}{
		{"no Subject", base, "Message\n{\"eventType\":\"Delivery\",\n\"x\":1}\nMessageId\n7d4f1c2a-9b3e-5f60-8a71-0c2d3e4f5a6b\n" +
			"Timestamp\n2026-12-01T10:00:02.500Z\nTopicArn\narn:aws:sns:eu-west-1:123456789012:otp-feedback\nType\nNotification\n"},
		{"a Subject", withSubject, "Message\n{\"eventType\":\"Delivery\",\n\"x\":1}\nMessageId\n7d4f1c2a-9b3e-5f60-8a71-0c2d3e4f5a6b\n" +
			"Subject\nAmazon SES Email Event Notification\n" +
			"Timestamp\n2026-12-01T10:00:02.500Z\nTopicArn\narn:aws:sns:eu-west-1:123456789012:otp-feedback\nType\nNotification\n"},
		{"a Subject present but empty", emptySubject, "Message\n{\"eventType\":\"Delivery\",\n\"x\":1}\nMessageId\n7d4f1c2a-9b3e-5f60-8a71-0c2d3e4f5a6b\n" +
			"Subject\n\n" +
			"Timestamp\n2026-12-01T10:00:02.500Z\nTopicArn\narn:aws:sns:eu-west-1:123456789012:otp-feedback\nType\nNotification\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := stringToSign(tc.env); got != tc.want {
				t.Errorf("string to sign\n got %q\nwant %q", got, tc.want)
			}
		})
	}
	// From a body: a Subject of null is no Subject; escapes are decoded.
	env, err := decodeEnvelope([]byte(`{"Type":"Notification","MessageId":"m","Subject":null,"Message":"a\nb \"c\" \u0040",` +
		`"Timestamp":"t","TopicArn":"arn"}`))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := stringToSign(env), "Message\na\nb \"c\" @\nMessageId\nm\nTimestamp\nt\nTopicArn\narn\nType\nNotification\n"; got != want {
		t.Errorf("from a body\n got %q\nwant %q", got, want)
	}
}

// TestTopicARN: OTP_SES_FEEDBACK_TOPIC_ARN must be a standard topic's ARN.
func TestTopicARN(t *testing.T) {
	for arn, ok := range map[string]bool{
		"arn:aws:sns:eu-west-1:123456789012:otp-feedback":        true,
		"arn:aws-cn:sns:cn-north-1:123456789012:otp_feedback":    true,
		"arn:aws-us-gov:sns:us-gov-west-1:123456789012:otp":      true,
		"arn:aws:sqs:eu-west-1:123456789012:otp-feedback":        false,
		"arn:aws:sns:eu-west-1:123456789012:otp-feedback.fifo":   false, // SES publishes to standard topics only
		"arn:aws:sns:eu-west-1:12345:otp":                        false,
		"arn:aws:sns:eu-west-1:123456789012:":                    false,
		"arn:aws:sns:eu-west-1:123456789012:otp-feedback\n":      false,
		"https://sns.eu-west-1.amazonaws.com/123456789012/topic": false,
	} {
		if validTopicARN(arn) != ok {
			t.Errorf("%q: valid %v, want %v", arn, !ok, ok)
		}
	}
}

// TestRedactKeepsTheShapeAndNoAddress: a dead letter's body keeps its JSON (and the SES
// record's JSON inside Message) with every address and IP redacted, wherever the record
// has them (destination, the headers, bounced recipients, the diagnostic, a tag), even
// spelled with a JSON escape; what names nobody stays byte for byte.
func TestRedactKeepsTheShapeAndNoAddress(t *testing.T) {
	r := record("Bounce", bounce, tags())
	r["mail"].(map[string]any)["commonHeaders"] = map[string]any{"from": []string{"Acme <no-reply@acme.example>"},
		"to": []string{"Ana <ana@example.com>"}, "subject": "Your code"}
	body := viaSNS(t, r)
	body = bytes.Replace(body, []byte(`\"mail\"`), []byte(`\"cc\":\"ana\\u0040example.org\",\"mail\"`), 1)
	if !json.Valid(body) {
		t.Fatalf("test body is not JSON: %s", body)
	}

	out := Redact(body)
	for _, leak := range []string{"ana@", "example.org", "no-reply@", "192.0.2.1", "198.51.100.7"} {
		if bytes.Contains(out, []byte(leak)) {
			t.Errorf("redacted body still holds %q: %s", leak, out)
		}
	}
	var env snsEnvelope
	if err := json.Unmarshal(out, &env); err != nil || env.MessageID != "7d4f1c2a-9b3e-5f60-8a71-0c2d3e4f5a6b" {
		t.Fatalf("the envelope is no longer JSON (%v): %s", err, out)
	}
	var rec struct {
		Mail struct {
			MessageID   string              `json:"messageId"`
			Destination []string            `json:"destination"`
			Tags        map[string][]string `json:"tags"`
		} `json:"mail"`
		CC string `json:"cc"`
	}
	if err := json.Unmarshal([]byte(env.Message), &rec); err != nil {
		t.Fatalf("the record is no longer JSON (%v): %s", err, env.Message)
	}
	if rec.Mail.MessageID != "0100018c1d2e3f40-5a6b7c8d-example-000000" || rec.Mail.Destination[0] != "<address>" ||
		rec.Mail.Tags["challenge_id"][0] != challenge || rec.Mail.Tags["ses:source-ip"][0] != "<ip>" || rec.CC != "<address>" {
		t.Errorf("redacted record %+v", rec)
	}
	if !strings.Contains(env.Message, `"timestamp":"2026-12-01T10:00:01.669Z"`) {
		t.Errorf("a time was taken for an address: %s", env.Message)
	}

	if got := Redact([]byte("bounce for ana@example.com from 198.51.100.7")); string(got) != "bounce for <address> from <ip>" {
		t.Errorf("text body: %q", got)
	}
	clean := []byte(`{"Type":"Notification",  "MessageId":"m","Message":"{\"eventType\":\"Open\"}"}`)
	if got := Redact(clean); !bytes.Equal(got, clean) {
		t.Errorf("a body without addresses changed: %s", got)
	}
}
