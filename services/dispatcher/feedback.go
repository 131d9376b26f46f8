package dispatcher

import (
	"context"
	"errors"
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
// ends. Each becomes otp.feedback.<tenant> on OTP_EVENTS (sesfeedback.Parse), published
// with the notification's own id, so one read twice is stored once; a type otpflow has no
// use for is dropped; one it refuses goes to OTP_DLQ, sealed, with the reason. A message
// is deleted from the queue only once its event or its dead letter is stored: one whose
// publish failed comes back when its visibility timeout ends, and is tried again.
func (s *Service) readFeedback(ctx context.Context) error {
	q, url := s.cfg.FeedbackQueue, s.cfg.FeedbackQueueURL
	s.log.Info("reading SES feedback", "queue", url)
	pause := time.Second
	for ctx.Err() == nil {
		out, err := q.ReceiveMessage(ctx, &sqs.ReceiveMessageInput{QueueUrl: aws.String(url), MaxNumberOfMessages: 10,
			WaitTimeSeconds: feedbackWait, MessageSystemAttributeNames: []sqstypes.MessageSystemAttributeName{
				sqstypes.MessageSystemAttributeNameApproximateReceiveCount}})
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			s.feedbackReads.WithLabelValues("receive_failed").Inc()
			s.log.Warn("receive SES feedback; retrying", "retry_in", pause, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(pause):
			}
			pause = min(2*pause, feedbackRetryMax)
			continue
		}
		pause = time.Second
		for _, m := range out.Messages {
			s.handleFeedback(ctx, m)
		}
	}
	return nil
}

// handleFeedback stores one notification, or its dead letter, then deletes it.
func (s *Service) handleFeedback(ctx context.Context, m sqstypes.Message) {
	body := aws.ToString(m.Body)
	n, err := sesfeedback.Parse([]byte(body), s.now())
	var refused *sesfeedback.Error
	switch {
	case errors.Is(err, sesfeedback.ErrIgnored):
		s.feedbackReads.WithLabelValues("ignored").Inc()
	case errors.As(err, &refused):
		id := "dlq:sqs:" + feedbackToken(aws.ToString(m.MessageId))
		raw := &jetstream.RawStreamMsg{Subject: "sqs." + queueName(s.cfg.FeedbackQueueURL), Data: []byte(body), Time: s.now()}
		if err := platform.PublishDeadLetterOf(ctx, s.js, &platform.DeadLetters{Sealer: s.cfg.DLQKey}, events.ConsumerDispatcher+"-feedback",
			"_unknown", "SQS", raw, "ses feedback: "+refused.Error(), id); err != nil {
			s.log.Warn("dead-letter an SES notification; it will come back", "err", err)
			return
		}
		s.feedbackReads.WithLabelValues("dead_lettered").Inc()
		s.log.Warn("SES notification dead-lettered", "reason", refused.Reason, "detail", refused.Detail)
	case err != nil:
		s.log.Error("read an SES notification", "err", err)
		return
	default:
		msg, err := events.NewMsg(events.TypeFeedback, n.Event.Tenant, n.MsgID(), n.Event.ChallengeID, n.Event,
			events.Envelope{Source: "otpflow/dispatcher", Time: s.now()})
		if err == nil {
			_, err = s.js.PublishMsg(ctx, msg)
		}
		if err != nil {
			s.log.Warn("publish otp.feedback; the notification will come back", "err", err)
			return
		}
		s.feedbackReads.WithLabelValues(string(n.Event.Kind)).Inc()
	}
	if _, err := s.cfg.FeedbackQueue.DeleteMessage(ctx, &sqs.DeleteMessageInput{QueueUrl: aws.String(s.cfg.FeedbackQueueURL),
		ReceiptHandle: m.ReceiptHandle}); err != nil {
		// It comes back and is stored again under the same id: the stream drops it.
		s.log.Warn("delete an SES notification from its queue", "err", err)
	}
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

// recipientTags are the tags of a mail's recipient: its subject hash under the active
// key, as two tags (SES takes no ':' in a tag value).
func (s *Service) recipientTags(tenant, recipient string, tags map[string]string) {
	if s.cfg.Subjects == nil {
		return
	}
	if id, h, ok := strings.Cut(s.cfg.Subjects.Subject(tenant, recipient), ":"); ok {
		tags[sesfeedback.TagRecipientKey], tags[sesfeedback.TagRecipientHash] = id, h
	}
}
