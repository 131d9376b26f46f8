package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback"
)

// FeedbackQueue is what the feedback reader calls on the SQS client.
type FeedbackQueue interface {
	ReceiveMessage(ctx context.Context, in *sqs.ReceiveMessageInput, optFns ...func(*sqs.Options)) (*sqs.ReceiveMessageOutput, error)
	DeleteMessage(ctx context.Context, in *sqs.DeleteMessageInput, optFns ...func(*sqs.Options)) (*sqs.DeleteMessageOutput, error)
}

// feedbackWait is the long poll of one receive (SQS's longest), and feedbackRetryMax
// the longest pause after a failed one.
const (
	feedbackWait     = 20
	feedbackRetryMax = 30 * time.Second
)

// readFeedback reads the SES event notifications of OTP_SES_FEEDBACK_QUEUE_URL until ctx
// ends. With OTP_SES_FEEDBACK_TOPIC_ARN, only those SNS signed for that topic are taken
// (sesfeedback.Verifier). Each becomes otp.feedback.<tenant> on OTP_EVENTS
// (sesfeedback.Parse), published with the notification's own id, so one read twice is
// stored once; a type otpflow has no use for, or a mail it did not send, is dropped; one
// it refuses goes to OTP_DLQ, sealed, its addresses redacted, with the reason. A message
// is deleted from the queue only once its event or its dead letter is stored. When
// storing fails (or the signing certificate cannot be fetched), the rest of the batch is
// left to come back after its visibility timeout and the reader pauses, longer each time,
// so an outage of NATS costs receives, not notifications (the queue's own redrive policy
// should allow many).
func (s *Service) readFeedback(ctx context.Context) {
	q, url := s.cfg.FeedbackQueue, s.cfg.FeedbackQueueURL
	s.log.Info("reading SES feedback", "queue", url)
	if s.cfg.FeedbackSignatures == nil {
		s.log.Warn("SES feedback: SNS signatures are not checked (OTP_SES_FEEDBACK_TOPIC_ARN is not set): whoever can write " +
			"to the queue and has seen one notification of a mail can report that mail bounced or complained; set it outside a local emulator")
	}
	pause := time.Second
	wait := func() {
		select {
		case <-ctx.Done():
		case <-time.After(pause):
		}
		pause = min(2*pause, feedbackRetryMax)
	}
	for ctx.Err() == nil {
		out, err := q.ReceiveMessage(ctx, &sqs.ReceiveMessageInput{QueueUrl: aws.String(url), MaxNumberOfMessages: 10,
			WaitTimeSeconds: feedbackWait})
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.feedbackReads.WithLabelValues("receive_failed").Inc()
			s.log.Warn("receive SES feedback; retrying", "retry_in", pause, "err", err)
			wait()
			continue
		}
		stored := true
		for _, m := range out.Messages {
			if stored = s.handleFeedback(ctx, m); !stored {
				break
			}
		}
		if !stored {
			wait()
			continue
		}
		pause = time.Second
	}
}

// feedbackDLQMax bounds the body a dead letter of the queue keeps.
const feedbackDLQMax = 64 << 10

// handleFeedback stores one notification (or its dead letter, or nothing for one to drop),
// then deletes it from the queue. It reports false when it could not store it (or could
// not fetch the certificate to verify it): the message stays in the queue and comes back.
func (s *Service) handleFeedback(ctx context.Context, m sqstypes.Message) bool {
	body := aws.ToString(m.Body)
	var n sesfeedback.Notification
	var err error
	if v := s.cfg.FeedbackSignatures; v != nil {
		err = v.Verify(ctx, []byte(body), s.now())
	}
	if err == nil {
		n, err = sesfeedback.Parse([]byte(body), s.now())
	}
	if err == nil {
		err = s.authentic(n)
	}
	var refused *sesfeedback.Error
	switch {
	case errors.Is(err, sesfeedback.ErrIgnored):
		s.feedbackReads.WithLabelValues("ignored").Inc()
	case errors.Is(err, sesfeedback.ErrNotOurs):
		s.feedbackReads.WithLabelValues("not_ours").Inc()
	case errors.As(err, &refused):
		id := "dlq:sqs:" + feedbackToken(aws.ToString(m.MessageId))
		// Kept under tenant _unknown, where an erasure cannot find it: no addresses.
		data := sesfeedback.Redact([]byte(body))
		reason := "ses feedback: " + refused.Error()
		if size := len(data); size > feedbackDLQMax {
			data, reason = data[:feedbackDLQMax], reason+fmt.Sprintf(" (body cut to %d of %d bytes)", feedbackDLQMax, size)
		}
		raw := &jetstream.RawStreamMsg{Subject: "sqs." + queueName(s.cfg.FeedbackQueueURL), Data: data, Time: s.now()}
		if err := platform.PublishDeadLetterOf(ctx, s.js, &platform.DeadLetters{Sealer: s.cfg.DLQKey}, events.ConsumerDispatcher+"-feedback",
			"_unknown", "SQS", raw, reason, id); err != nil {
			s.feedbackReads.WithLabelValues("store_failed").Inc()
			s.log.Warn("dead-letter an SES notification; it will come back", "err", err)
			return false
		}
		s.feedbackReads.WithLabelValues("dead_lettered").Inc()
		s.log.Warn("SES notification dead-lettered", "reason", refused.Reason, "detail", refused.Detail)
	case err != nil:
		// Not a refusal: the signing certificate could not be fetched. Try again later.
		s.feedbackReads.WithLabelValues("cert_failed").Inc()
		s.log.Error("verify an SES notification; it will come back", "err", err)
		return false
	default:
		msg, err := events.NewMsg(events.TypeFeedback, n.Event.Tenant, n.MsgID(), n.Event.ChallengeID, n.Event,
			events.Envelope{Source: "otpflow/dispatcher", Time: s.now()})
		if err == nil {
			_, err = s.js.PublishMsg(ctx, msg)
		}
		if err != nil {
			s.feedbackReads.WithLabelValues("store_failed").Inc()
			s.log.Warn("publish otp.feedback; the notification will come back", "err", err)
			return false
		}
		s.feedbackReads.WithLabelValues(string(n.Event.Kind)).Inc()
	}
	// Stored: the delete runs even while the process stops, or the notification would be
	// stored again after the stream's duplicate window.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if _, err := s.cfg.FeedbackQueue.DeleteMessage(dctx, &sqs.DeleteMessageInput{QueueUrl: aws.String(s.cfg.FeedbackQueueURL),
		ReceiptHandle: m.ReceiptHandle}); err != nil {
		// It comes back and is stored again under the same id: the stream drops it.
		s.feedbackReads.WithLabelValues("delete_failed").Inc()
		s.log.Warn("delete an SES notification from its queue", "err", err)
	}
	return true
}

// queueName is the last element of a queue URL.
func queueName(url string) string { return feedbackToken(url[strings.LastIndexByte(url, '/')+1:]) }

// feedbackToken keeps s fit for a subject token or a message id.
func feedbackToken(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, s)
}

// recipientTags adds the tags of a mail's recipient, its subject hash under the active
// key (sesfeedback.RecipientTags), and the MAC of its identity tags (sesfeedback.MACTags).
func (s *Service) recipientTags(tenant, challenge string, codeSeq int, recipient string, tags map[string]string) {
	if s.cfg.Subjects == nil {
		return
	}
	hash := s.cfg.Subjects.Subject(tenant, recipient)
	mac := s.cfg.Subjects.TagMAC(tenant, sesfeedback.SignedValue(tenant, challenge, codeSeq, hash))
	for _, t := range []map[string]string{sesfeedback.RecipientTags(hash), sesfeedback.MACTags(mac)} {
		for k, v := range t {
			tags[k] = v
		}
	}
}

// authentic reports whether a notification's tags are the dispatcher's own: only a mail
// whose tags carry a MAC under the subject key names a code and a person. Without a
// subject key (which New and LoadConfig refuse) nothing is authentic.
func (s *Service) authentic(n sesfeedback.Notification) error {
	if s.cfg.Subjects == nil || n.MAC == "" || !s.cfg.Subjects.VerifyTagMAC(n.MAC, n.Event.Tenant, n.Signed) {
		return &sesfeedback.Error{Reason: sesfeedback.ReasonBadTag, Detail: "the mail's tags carry no valid otpflow MAC"}
	}
	return nil
}
