package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/ses/sestest"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback/sqstest"
)

// sesNotification is the SNS notification SES publishes for a bounce of the mail e, as an
// SQS queue subscribed to the topic holds it, unsigned (as a local emulator gives it).
func sesNotification(t *testing.T, snsID string, e sestest.Email) string {
	t.Helper()
	body, err := json.Marshal(map[string]any{"Type": "Notification", "MessageId": snsID, "TopicArn": feedbackTopic,
		"Message": sesRecord(t, "Bounce", e), "Timestamp": "2026-12-01T10:00:02.000Z"})
	testenv.Must(t, err, "notification")
	return string(body)
}

// feedbackTopic is the SNS topic of the configuration set's event destination.
const feedbackTopic = "arn:aws:sns:eu-west-1:123456789012:otp"

// sesRecord is the SES event record of eventType (Bounce, Complaint or Delivery) for the
// mail e: it names the mail by the message id SES gave it, carries the mail's tags, and
// names the recipient where SES does.
func sesRecord(t *testing.T, eventType string, e sestest.Email) string {
	t.Helper()
	tags := map[string][]string{"ses:configuration-set": {"otp"}, "ses:source-ip": {"198.51.100.7"}}
	for k, v := range e.Tags {
		tags[k] = []string{v}
	}
	r := map[string]any{"eventType": eventType, "mail": map[string]any{"timestamp": "2026-12-01T10:00:00.000Z", "messageId": e.MessageID,
		"destination": e.To, "commonHeaders": map[string]any{"to": e.To}, "tags": tags}}
	switch eventType {
	case "Bounce":
		r["bounce"] = map[string]any{"bounceType": "Permanent", "bounceSubType": "General", "timestamp": "2026-12-01T10:00:01.000Z",
			"feedbackId": "fb-1", "bouncedRecipients": []map[string]any{{"emailAddress": e.To[0], "status": "5.1.1",
				"diagnosticCode": "smtp; 550 5.1.1 <" + e.To[0] + ">: user unknown"}}}
	case "Complaint":
		r["complaint"] = map[string]any{"complainedRecipients": []map[string]any{{"emailAddress": e.To[0]}},
			"timestamp": "2026-12-01T10:00:01.000Z", "feedbackId": "fb-complaint", "complaintFeedbackType": "abuse"}
	case "Delivery":
		r["delivery"] = map[string]any{"timestamp": "2026-12-01T10:00:00.900Z", "recipients": e.To,
			"smtpResponse": "250 2.6.0 Message received", "remoteMtaIp": "198.51.100.7"}
	default:
		t.Fatalf("no record of type %s", eventType)
	}
	b, err := json.Marshal(r)
	testenv.Must(t, err, "record")
	return string(b)
}

// feedbackHarness runs a dispatcher that sends through an SES wire server and reads its
// feedback from the queue "otp-feedback" of an SQS wire server, both with the real SDKs;
// visibility, when set, is the queue's visibility timeout; signatures, when set, checks
// the notifications (OTP_SES_FEEDBACK_TOPIC_ARN).
func feedbackHarness(t *testing.T, visibility time.Duration, signatures *sesfeedback.Verifier) (*sestest.Server, *sqstest.Server, *harness) {
	t.Helper()
	srv, queue := sestest.New(t), sqstest.New(t)
	if visibility > 0 {
		queue.DefaultVisibility = visibility
	}
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
	client, err := sesfeedback.NewSQSClient(context.Background(), "eu-west-1", queue.URL())
	testenv.Must(t, err, "sqs client")
	h := sesFirstConfig(t, srv, Config{Guards: map[string]mailer.GuardConfig{"ses": {}},
		FeedbackQueue: client, FeedbackQueueURL: queue.QueueURL("otp-feedback"), FeedbackSignatures: signatures})
	return srv, queue, h
}

// TestSESFeedbackBecomesOtpFeedback: a code goes out through SES (the wire protocol, the
// real SDK) with its tags; SES's bounce notification for that mail, read from an SQS queue
// (the JSON protocol, the real SDK), becomes otp.feedback tied to the code and its
// person's subject hash, and leaves the queue. The same notification read again is stored
// once; one otpflow cannot read goes to OTP_DLQ, sealed, with its reason and its
// addresses redacted (it is kept under _unknown, where an erasure cannot reach it); one
// of a type otpflow does not use is dropped. None is left in the queue. Without
// OTP_SES_FEEDBACK_TOPIC_ARN, unsigned notifications are taken, with a warning.
func TestSESFeedbackBecomesOtpFeedback(t *testing.T) {
	srv, queue, h := feedbackHarness(t, 0, nil)

	const rcpt = "gone@example.com"
	h.publish(t, challenge(71), rcpt, "717171", time.Now().Add(5*time.Minute), "fb1")
	if d := h.deliveredVia(t, 1); d.Provider != "ses" {
		t.Fatalf("delivered %+v", d)
	}
	mail := srv.Emails()[0]
	hash := h.subjects.Subject("acme", rcpt)
	if want := sesfeedback.RecipientTags(hash); mail.Tags["recipient_key"] != want["recipient_key"] || mail.Tags["recipient_hash"] != want["recipient_hash"] {
		t.Fatalf("the mail's recipient tags %v, want those of the subject hash %q", mail.Tags, hash)
	}

	queue.Send("otp-feedback", sesNotification(t, "sns-1", mail))
	got := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.feedback.acme", 1, 30*time.Second)
	f := decode[events.Feedback](t, got[0])
	if f.Kind != events.FeedbackBounced || f.ChallengeID != challenge(71) || f.CodeSeq != 1 || f.RecipientHash != hash ||
		f.ProviderMessageID != mail.MessageID || f.BounceType != "Permanent" || !strings.Contains(f.Diagnostic, "<address>") {
		t.Fatalf("feedback %+v", f)
	}
	if strings.Contains(string(got[0].Data), rcpt) {
		t.Fatalf("otp.feedback quotes the address: %s", got[0].Data)
	}

	// Read again (SQS is at least once), a body otpflow cannot read, an Open.
	queue.Send("otp-feedback", sesNotification(t, "sns-1", mail))
	queue.Send("otp-feedback", `{"Type":"Notification","MessageId":"sns-2","Message":"bounce for `+rcpt+`"}`)
	queue.Send("otp-feedback", strings.Replace(sesNotification(t, "sns-3", mail), `\"eventType\":\"Bounce\"`, `\"eventType\":\"Open\"`, 1))
	testenv.Eventually(t, 30*time.Second, "the queue emptied", func() bool { return queue.Len("otp-feedback") == 0 })
	dead := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq._unknown", 1, 10*time.Second)
	if n := len(testenv.Messages(t, h.js, events.StreamDLQ, "otp.dlq.>")); n != 1 {
		t.Fatalf("%d dead letters, want only the unreadable one's", n)
	}
	if r := dead[0].Header.Get(events.HeaderDLQReason); !strings.Contains(r, sesfeedback.ReasonMalformed) {
		t.Fatalf("dead letter reason %q", r)
	}
	if strings.Contains(string(dead[0].Data), rcpt) {
		t.Fatalf("the dead letter is not sealed: %s", dead[0].Data)
	}
	if orig := testenv.OpenDeadLetter(t, h.dlq, dead[0]); !strings.Contains(string(orig.Data), "bounce for <address>") ||
		strings.Contains(string(orig.Data), rcpt) || orig.Subject != "sqs.otp-feedback" {
		t.Fatalf("the dead letter holds %s: %q", orig.Subject, orig.Data)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.feedback.acme")); n != 1 {
		t.Fatalf("%d otp.feedback events, want the one", n)
	}
	if queue.Deleted() != 4 {
		t.Fatalf("%d notifications deleted, want 4", queue.Deleted())
	}
	if !strings.Contains(h.log.String(), "SNS signatures are not checked") {
		t.Error("no warning that SNS signatures are not checked")
	}
}

// TestAFeedbackNotStoredComesBack: while OTP_EVENTS takes no otp.feedback (its subject
// taken off the stream stands for any failure to store), a notification is not deleted; it
// comes back when its visibility timeout ends, and once the stream takes the event again
// it is stored once and deleted.
func TestAFeedbackNotStoredComesBack(t *testing.T) {
	srv, queue, h := feedbackHarness(t, time.Second, nil)
	h.publish(t, challenge(72), "late@example.com", "727272", time.Now().Add(5*time.Minute), "fb2")
	h.deliveredVia(t, 1)

	ctx := context.Background()
	stream, err := h.js.Stream(ctx, events.StreamEvents)
	testenv.Must(t, err, "stream")
	info, err := stream.Info(ctx)
	testenv.Must(t, err, "stream info")
	full := info.Config
	cut := full
	cut.Subjects = slices.DeleteFunc(slices.Clone(full.Subjects), func(s string) bool { return s == events.TypeFeedback.Wildcard() })
	_, err = h.js.UpdateStream(ctx, cut)
	testenv.Must(t, err, "take otp.feedback off the stream")

	id := queue.Send("otp-feedback", sesNotification(t, "sns-late", srv.Emails()[0]))
	testenv.Eventually(t, 20*time.Second, "the notification read twice, stored never", func() bool { return queue.Receives("otp-feedback", id) >= 2 })
	if queue.Deleted() != 0 || queue.Len("otp-feedback") != 1 {
		t.Fatalf("a notification whose event was not stored was deleted (%d deleted)", queue.Deleted())
	}
	_, err = h.js.UpdateStream(ctx, full)
	testenv.Must(t, err, "give otp.feedback back")
	testenv.Eventually(t, 20*time.Second, "the notification stored and deleted", func() bool { return queue.Len("otp-feedback") == 0 })
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.feedback.acme")); n != 1 {
		t.Fatalf("%d otp.feedback events, want 1", n)
	}
}

// TestABigUnreadableNotificationIsKeptCut: a queue message too big to seal into OTP_DLQ
// whole (SQS takes up to 1 MiB, NATS messages are smaller) is dead-lettered with its body
// cut, and the reason says so; it does not come back forever.
func TestABigUnreadableNotificationIsKeptCut(t *testing.T) {
	_, queue, h := feedbackHarness(t, 0, nil)
	body := `{"Type":"Notification","MessageId":"big","Message":"` + strings.Repeat("x", 600<<10) + `"}`
	queue.Send("otp-feedback", body)
	testenv.Eventually(t, 30*time.Second, "the queue emptied", func() bool { return queue.Len("otp-feedback") == 0 })
	dead := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq._unknown", 1, 10*time.Second)
	if r := dead[0].Header.Get(events.HeaderDLQReason); !strings.Contains(r, "cut to 65536 of 614454 bytes") {
		t.Fatalf("reason %q", r)
	}
	if orig := testenv.OpenDeadLetter(t, h.dlq, dead[0]); len(orig.Data) != feedbackDLQMax || string(orig.Data) != body[:feedbackDLQMax] {
		t.Fatalf("kept %d bytes", len(orig.Data))
	}
}

// TestForgedFeedbackIsRefused is the attack of whoever can write to the feedback queue (or
// its SNS topic) and has read the audit stream, where subject hashes are: they take a real
// notification of their own mail and rewrite its tags to name another person's hash, another
// challenge, another code, or drop the MAC, to get that person suppressed or a code marked
// bounced. Each forgery is dead-lettered with reason bad_tag and makes no otp.feedback; the
// genuine notification still does.
func TestForgedFeedbackIsRefused(t *testing.T) {
	srv, queue, h := feedbackHarness(t, 0, nil)
	h.publish(t, challenge(73), "attacker@example.com", "737373", time.Now().Add(5*time.Minute), "fb3")
	h.deliveredVia(t, 1)
	mail := srv.Emails()[0]
	if mail.Tags[sesfeedback.TagMAC] == "" {
		t.Fatalf("the mail carries no MAC tag: %v", mail.Tags)
	}

	victim := sesfeedback.RecipientTags(h.subjects.Subject("acme", "victim@example.com"))
	forge := func(change func(tags map[string]string)) sestest.Email {
		e := mail
		e.Tags = maps.Clone(mail.Tags)
		change(e.Tags)
		return e
	}
	forgeries := map[string]sestest.Email{
		"another person": forge(func(tags map[string]string) {
			tags[sesfeedback.TagRecipientHash] = victim[sesfeedback.TagRecipientHash]
		}),
		"another challenge": forge(func(tags map[string]string) { tags[sesfeedback.TagChallenge] = challenge(74) }),
		"another code":      forge(func(tags map[string]string) { tags[sesfeedback.TagCodeSeq] = "2" }),
		"another tenant":    forge(func(tags map[string]string) { tags[sesfeedback.TagTenant] = "globex" }),
		"no MAC":            forge(func(tags map[string]string) { delete(tags, sesfeedback.TagMAC) }),
		"a made-up MAC":     forge(func(tags map[string]string) { tags[sesfeedback.TagMAC] = strings.Repeat("A", 43) }),
	}
	i := 0
	for _, e := range forgeries {
		i++
		queue.Send("otp-feedback", sesNotification(t, fmt.Sprintf("forged-%d", i), e))
	}
	testenv.Eventually(t, 30*time.Second, "the forgeries read", func() bool { return queue.Len("otp-feedback") == 0 })
	dead := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq._unknown", len(forgeries), 10*time.Second)
	for _, d := range dead {
		if r := d.Header.Get(events.HeaderDLQReason); !strings.Contains(r, sesfeedback.ReasonBadTag) {
			t.Errorf("dead letter reason %q, want %s", r, sesfeedback.ReasonBadTag)
		}
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.feedback.>")); n != 0 {
		t.Fatalf("%d otp.feedback events from forged notifications", n)
	}

	queue.Send("otp-feedback", sesNotification(t, "genuine", mail))
	got := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.feedback.acme", 1, 30*time.Second)
	if f := decode[events.Feedback](t, got[0]); f.ChallengeID != challenge(73) || f.RecipientHash != h.subjects.Subject("acme", "attacker@example.com") {
		t.Fatalf("feedback %+v", f)
	}
}
