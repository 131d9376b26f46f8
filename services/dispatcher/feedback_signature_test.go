package dispatcher

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback/snstest"
)

// TestSignedSESFeedback: with OTP_SES_FEEDBACK_TOPIC_ARN, notifications SNS signed for the
// topic become otp.feedback (signature versions 1 and 2). The attack of the review: whoever
// saw the signed Delivery notification of a person's mail and can write to the queue
// turns it into a Complaint and sends it again under a new MessageId with the old
// signature, to get the person suppressed. It is dead-lettered (bad_signature) and
// publishes nothing; so are a Complaint SNS signed for another topic (wrong_topic), ones
// whose certificate is on another host or over http, though they verify with the
// certificate served there (bad_signature), a raw SES record and an unsigned envelope
// (unsigned), and a signed one too old (stale). Their dead letters hold no address.
func TestSignedSESFeedback(t *testing.T) {
	sns := snstest.New(t, feedbackTopic, snstest.Options{})
	evilURLs := []string{"https://sns.eu-west-1.amazonaws.com.evil.example/SimpleNotificationService-test.pem",
		"http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem"}
	topics := []*snstest.Topic{sns}
	for _, u := range evilURLs {
		topics = append(topics, snstest.New(t, feedbackTopic, snstest.Options{CertURL: u}))
	}
	verifier, err := sesfeedback.NewVerifier(feedbackTopic, snstest.Fetch(topics...))
	testenv.Must(t, err, "verifier")
	srv, queue, h := feedbackHarness(t, 0, verifier)

	const rcpt = "ana.victim@example.com"
	h.publish(t, challenge(75), rcpt, "757575", time.Now().Add(5*time.Minute), "fb5")
	h.deliveredVia(t, 1)
	mail := srv.Emails()[0]

	now := time.Now()
	delivery := sns.Publish("sns-delivery", sesRecord(t, "Delivery", mail), now.Add(-time.Second), "2")
	queue.Send("otp-feedback", delivery.JSON())
	queue.Send("otp-feedback", sns.Publish("sns-bounce", sesRecord(t, "Bounce", mail), now, "1").JSON())
	got := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.feedback.acme", 2, 30*time.Second)
	kinds := map[events.FeedbackKind]bool{}
	for _, m := range got {
		f := decode[events.Feedback](t, m)
		if f.ChallengeID != challenge(75) || f.RecipientHash != h.subjects.Subject("acme", rcpt) {
			t.Fatalf("feedback %+v", f)
		}
		kinds[f.Kind] = true
	}
	if !kinds[events.FeedbackMailboxDelivered] || !kinds[events.FeedbackBounced] {
		t.Fatalf("feedback kinds %v, want mailbox_delivered and bounced", kinds)
	}

	complaint := sesRecord(t, "Complaint", mail)
	forged := delivery
	forged.MessageID, forged.Message = "sns-forged", complaint
	unsigned, err := json.Marshal(map[string]any{"Type": "Notification", "MessageId": "sns-unsigned", "TopicArn": feedbackTopic,
		"Message": complaint, "Timestamp": now.UTC().Format(time.RFC3339Nano)})
	testenv.Must(t, err, "unsigned notification")
	refused := map[string]string{ // SQS message id: the reason
		queue.Send("otp-feedback", forged.JSON()): sesfeedback.ReasonBadSignature,
		queue.Send("otp-feedback", sns.WithARN("arn:aws:sns:eu-west-1:999999999999:attacker").Publish("sns-other", complaint, now, "2").JSON()): sesfeedback.ReasonWrongTopic,
		queue.Send("otp-feedback", complaint):                                                                sesfeedback.ReasonUnsigned,
		queue.Send("otp-feedback", string(unsigned)):                                                         sesfeedback.ReasonUnsigned,
		queue.Send("otp-feedback", sns.Publish("sns-old", complaint, now.Add(-15*24*time.Hour), "2").JSON()): sesfeedback.ReasonStale,
	}
	for i, attacker := range topics[1:] {
		refused[queue.Send("otp-feedback", attacker.Publish(fmt.Sprintf("sns-evil-%d", i), complaint, now, "2").JSON())] = sesfeedback.ReasonBadSignature
	}
	testenv.Eventually(t, 30*time.Second, "the queue emptied", func() bool { return queue.Len("otp-feedback") == 0 })
	dead := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq._unknown", len(refused), 10*time.Second)
	if len(dead) != len(refused) {
		t.Fatalf("%d dead letters, want %d", len(dead), len(refused))
	}
	for _, d := range dead {
		sqsID, _ := strings.CutPrefix(d.Header.Get(jetstream.MsgIDHeader), "dlq:sqs:")
		want, ok := refused[sqsID]
		if !ok {
			t.Fatalf("a dead letter of no message sent: %q", d.Header.Get(jetstream.MsgIDHeader))
		}
		if r := d.Header.Get(events.HeaderDLQReason); !strings.Contains(r, " "+want+":") {
			t.Errorf("dead letter of %s: reason %q, want %s", sqsID, r, want)
		}
		orig := testenv.OpenDeadLetter(t, h.dlq, d)
		if strings.Contains(string(orig.Data), rcpt) || strings.Contains(string(orig.Data), "198.51.100.7") {
			t.Errorf("the dead letter of %s names the recipient or an IP: %s", sqsID, orig.Data)
		}
		if !json.Valid(orig.Data) || !strings.Contains(string(orig.Data), "<address>") {
			t.Errorf("the dead letter of %s is not the redacted JSON: %s", sqsID, orig.Data)
		}
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.feedback.>")); n != 2 {
		t.Fatalf("%d otp.feedback events, want the 2 signed ones", n)
	}
	if strings.Contains(h.log.String(), "SNS signatures are not checked") {
		t.Error("warned that signatures are not checked, with a topic set")
	}
}

// TestNoSubjectKeyNoAuthenticFeedback: without a subject key (which New and LoadConfig
// refuse), no notification's tags are taken as the dispatcher's own: the MAC check fails
// closed.
func TestNoSubjectKeyNoAuthenticFeedback(t *testing.T) {
	s := &Service{}
	err := s.authentic(sesfeedback.Notification{MAC: "k1:" + strings.Repeat("A", 43), Signed: sesfeedback.SignedValue("acme", challenge(1), 1, "")})
	var e *sesfeedback.Error
	if !errors.As(err, &e) || e.Reason != sesfeedback.ReasonBadTag {
		t.Fatalf("authentic without a subject key: %v, want %s", err, sesfeedback.ReasonBadTag)
	}
}
