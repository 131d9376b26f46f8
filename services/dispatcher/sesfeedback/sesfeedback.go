// Package sesfeedback reads the event notifications Amazon SES publishes for a
// configuration set (Bounce, Complaint, Delivery, Reject, DeliveryDelay, Rendering
// Failure) as they arrive in an SQS queue subscribed to the SNS topic the configuration
// set publishes to, with or without SNS's raw message delivery. Parse turns one
// queue message body into the otp.feedback event of the code the mail carried, found by
// the message tags the dispatcher's SES provider sets (tenant, challenge id, code
// sequence and the recipient's subject hash). Parse is pure: no network, no clock.
//
// The tags' MAC says which mail a notification is about, not what happened to it: a
// Verifier (sns.go) checks, before Parse, that Amazon SNS signed the notification as it
// stands, for the configuration set's topic, recently.
package sesfeedback

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/otpflow/otpflow/events"
)

// The message tags the dispatcher sets on an SES send and Parse reads back. SES takes
// only [0-9A-Za-z_-] in a tag value, so the recipient's subject hash ("<key id>:<hash>")
// travels as two tags (RecipientTags): the key id in unpadded base64url (a key id may
// hold '.') and the hash, base64url already.
const (
	TagTenant        = "tenant"
	TagChallenge     = "challenge_id"
	TagCodeSeq       = "code_seq"
	TagRecipientKey  = "recipient_key"
	TagRecipientHash = "recipient_hash"
	// TagMAC authenticates the tags above: the MAC (keys.Subjects.TagMAC, without its key
	// id, which is the recipient_key's) of SignedValue.
	TagMAC = "otpflow_mac"
)

// SignedValue is what TagMAC authenticates: the tenant, challenge, code sequence and
// recipient hash of a mail, NUL-separated.
func SignedValue(tenant, challenge string, codeSeq int, recipientHash string) string {
	return strings.Join([]string{tenant, challenge, strconv.Itoa(codeSeq), recipientHash}, "\x00")
}

// MACTags are the tags of a mail's identity tags' MAC, mac being "<key id>:<mac>" under
// the key of its recipient hash; none for a value that is not one.
func MACTags(mac string) map[string]string {
	_, m, ok := strings.Cut(mac, ":")
	if !ok || m == "" {
		return nil
	}
	return map[string]string{TagMAC: m}
}

// maxBody bounds a queue message body; SQS's own limit is 256 KiB.
const maxBody = 256 << 10

// Reasons of an Error: what is wrong with a notification.
const (
	ReasonMalformed    = "malformed"     // not the JSON of an SNS notification or an SES event
	ReasonNotEvent     = "not_an_event"  // an SNS message of another type (SubscriptionConfirmation, ...)
	ReasonUnknownType  = "unknown_type"  // an SES event type this version does not know
	ReasonBadTag       = "bad_tag"       // an otpflow tag whose value cannot be ours
	ReasonMissingField = "missing_field" // a field SES always sends for the type is missing

	// The Verifier's (sns.go), when OTP_SES_FEEDBACK_TOPIC_ARN names the topic.
	ReasonUnsigned     = "unsigned"      // no SNS signature: a raw SES record (raw message delivery), or an envelope without one
	ReasonBadSignature = "bad_signature" // an SNS signature that does not verify, or a certificate that is not SNS's to sign with
	ReasonWrongTopic   = "wrong_topic"   // signed by SNS, but for another topic than the configured one
	ReasonStale        = "stale"         // an SNS Timestamp older than MaxAge, or ahead of the clock by more than MaxSkew
)

// Error is a notification Parse refuses, with the reason (one of the Reason constants)
// and a detail that quotes nothing of the body but field names and types.
type Error struct {
	Reason string
	Detail string
}

func (e *Error) Error() string { return "ses notification " + e.Reason + ": " + e.Detail }

// ErrIgnored is a notification of a type otpflow has no use for (Send, Open, Click,
// Subscription): the caller drops it without dead-lettering it.
var ErrIgnored = errors.New("ses notification of a type otpflow does not use")

// ErrNotOurs is a notification of a mail without otpflow's tags: another sender's on a
// shared configuration set, or an identity's feedback notification (which carries no
// tags). The caller drops it: it names nobody otpflow knows, and keeping it would keep
// another sender's recipients.
var ErrNotOurs = errors.New("ses notification of a mail otpflow did not send")

// RecipientTags are the tags that carry a subject hash ("<key id>:<hash>") through SES;
// none for a value that is not one.
func RecipientTags(subjectHash string) map[string]string {
	id, h, ok := strings.Cut(subjectHash, ":")
	if !ok || !events.IsSubjectHash(subjectHash) {
		return nil
	}
	return map[string]string{TagRecipientKey: base64.RawURLEncoding.EncodeToString([]byte(id)), TagRecipientHash: h}
}

// Notification is what Parse makes of one queue message: the event to publish and the
// id to publish it under.
type Notification struct {
	// ID is the notification's own id (the SNS MessageId, or the SES feedback id when
	// the body is a raw SES event): a redelivered queue message gives the same one.
	ID    string
	Event events.Feedback
	// MAC is the mail's tag MAC, "<key id>:<mac>" under the recipient_key's key, empty
	// when the mail carried none; Signed is the value it must authenticate
	// (SignedValue). The caller verifies it (keys.Subjects.VerifyTagMAC).
	MAC, Signed string
}

// MsgID is the Nats-Msg-Id of the otp.feedback event, so a notification read twice is
// stored once.
func (n Notification) MsgID() string { return "feedback:ses:" + n.ID }

// snsEnvelope is an SNS message as SQS holds it without raw message delivery. Parse and
// the Verifier decode a body into this one type, so the Message the Verifier checked is
// the Message Parse reads, whatever the body does with duplicate or oddly cased names.
type snsEnvelope struct {
	Type      string `json:"Type"`
	MessageID string `json:"MessageId"`
	Message   string `json:"Message"`
	// Subject is nil when absent: it is in the string to sign only when present.
	Subject          *string `json:"Subject"`
	Timestamp        string  `json:"Timestamp"`
	TopicArn         string  `json:"TopicArn"`
	SignatureVersion string  `json:"SignatureVersion"`
	Signature        string  `json:"Signature"`
	SigningCertURL   string  `json:"SigningCertURL"`
}

// sesEvent is an SES event record; notificationType is its name without event
// publishing.
type sesEvent struct {
	EventType        string `json:"eventType"`
	NotificationType string `json:"notificationType"`
	Mail             *struct {
		Timestamp time.Time           `json:"timestamp"`
		MessageID string              `json:"messageId"`
		Tags      map[string][]string `json:"tags"`
	} `json:"mail"`
	Bounce *struct {
		BounceType        string `json:"bounceType"`
		BounceSubType     string `json:"bounceSubType"`
		BouncedRecipients []struct {
			Status         string `json:"status"`
			DiagnosticCode string `json:"diagnosticCode"`
		} `json:"bouncedRecipients"`
		Timestamp  time.Time `json:"timestamp"`
		FeedbackID string    `json:"feedbackId"`
	} `json:"bounce"`
	Complaint *struct {
		ComplaintFeedbackType string    `json:"complaintFeedbackType"`
		ComplaintSubType      string    `json:"complaintSubType"`
		Timestamp             time.Time `json:"timestamp"`
		FeedbackID            string    `json:"feedbackId"`
	} `json:"complaint"`
	Delivery *struct {
		Timestamp    time.Time `json:"timestamp"`
		SMTPResponse string    `json:"smtpResponse"`
	} `json:"delivery"`
	Reject *struct {
		Reason string `json:"reason"`
	} `json:"reject"`
	Failure *struct {
		ErrorMessage string `json:"errorMessage"`
	} `json:"failure"`
	DeliveryDelay *struct {
		DelayType         string    `json:"delayType"`
		Timestamp         time.Time `json:"timestamp"`
		DelayedRecipients []struct {
			Status         string `json:"status"`
			DiagnosticCode string `json:"diagnosticCode"`
		} `json:"delayedRecipients"`
	} `json:"deliveryDelay"`
}

// Parse reads one queue message body. It returns ErrIgnored for a notification type
// otpflow has no use for and an *Error for one it refuses; every refusal is safe to
// dead-letter as it is (the detail quotes no value). received is when the queue gave it.
func Parse(body []byte, received time.Time) (Notification, error) {
	var n Notification
	record := body
	env, err := decodeEnvelope(body)
	if err != nil {
		return n, err
	}
	if env.Type != "" {
		// An SNS envelope: the SES record is its Message, a JSON string.
		if env.Type != "Notification" {
			return n, &Error{ReasonNotEvent, "SNS message of type " + quoteToken(env.Type)}
		}
		if env.MessageID == "" || env.Message == "" {
			return n, &Error{ReasonMissingField, "SNS notification without MessageId or Message"}
		}
		n.ID, record = env.MessageID, []byte(env.Message)
	}
	var e sesEvent
	if err := json.Unmarshal(record, &e); err != nil {
		return n, &Error{ReasonMalformed, "SES record is not a JSON object of the documented shape"}
	}
	typ := e.EventType
	if typ == "" {
		typ = e.NotificationType
	}
	switch typ {
	case "Send", "Open", "Click", "Subscription", "AmazonSnsSubscriptionSucceeded":
		return n, ErrIgnored
	}
	if e.Mail == nil || e.Mail.MessageID == "" {
		if typ == "" {
			return n, &Error{ReasonMalformed, "neither an SNS notification nor an SES event"}
		}
		return n, &Error{ReasonMissingField, "mail.messageId"}
	}
	f := events.Feedback{Provider: "ses", ProviderMessageID: e.Mail.MessageID, SentAt: e.Mail.Timestamp.UTC(), ReceivedAt: received.UTC()}
	var feedbackID string
	switch typ {
	case "Bounce":
		if e.Bounce == nil {
			return n, &Error{ReasonMissingField, "bounce"}
		}
		b := e.Bounce
		f.Kind, f.BounceType, f.BounceSubType, f.OccurredAt, feedbackID = events.FeedbackBounced, token(b.BounceType), token(b.BounceSubType), b.Timestamp, b.FeedbackID
		if len(b.BouncedRecipients) > 0 {
			f.Diagnostic = diagnostic(b.BouncedRecipients[0].Status, b.BouncedRecipients[0].DiagnosticCode)
		}
	case "Complaint":
		if e.Complaint == nil {
			return n, &Error{ReasonMissingField, "complaint"}
		}
		c := e.Complaint
		f.Kind, f.ComplaintType, f.OccurredAt, feedbackID = events.FeedbackComplained, token(c.ComplaintFeedbackType), c.Timestamp, c.FeedbackID
		if c.ComplaintSubType != "" {
			f.Diagnostic = events.Reason("complaint sub-type "+c.ComplaintSubType, 500)
		}
	case "Delivery":
		if e.Delivery == nil {
			return n, &Error{ReasonMissingField, "delivery"}
		}
		f.Kind, f.OccurredAt, f.Diagnostic = events.FeedbackMailboxDelivered, e.Delivery.Timestamp, diagnostic("", e.Delivery.SMTPResponse)
	case "Reject":
		f.Kind, f.OccurredAt = events.FeedbackRejected, e.Mail.Timestamp
		if e.Reject != nil {
			f.Diagnostic = diagnostic("", e.Reject.Reason)
		}
	case "Rendering Failure":
		f.Kind, f.OccurredAt, f.Diagnostic = events.FeedbackRejected, e.Mail.Timestamp, "rendering failure"
		if e.Failure != nil {
			f.Diagnostic = diagnostic("rendering failure:", e.Failure.ErrorMessage)
		}
	case "DeliveryDelay":
		if e.DeliveryDelay == nil {
			return n, &Error{ReasonMissingField, "deliveryDelay"}
		}
		d := e.DeliveryDelay
		f.Kind, f.DelayType, f.OccurredAt = events.FeedbackDelayed, token(d.DelayType), d.Timestamp
		if len(d.DelayedRecipients) > 0 {
			f.Diagnostic = diagnostic(d.DelayedRecipients[0].Status, d.DelayedRecipients[0].DiagnosticCode)
		}
	case "":
		return n, &Error{ReasonMissingField, "eventType"}
	default:
		return n, &Error{ReasonUnknownType, "event type " + quoteToken(typ)}
	}
	if f.OccurredAt.IsZero() {
		f.OccurredAt = f.SentAt
	}
	f.OccurredAt = f.OccurredAt.UTC()
	if err := readTags(e.Mail.Tags, &f); err != nil {
		return n, err
	}
	if m := firstTag(e.Mail.Tags, TagMAC); m != "" && f.RecipientHash != "" {
		id, _, _ := strings.Cut(f.RecipientHash, ":")
		n.MAC = id + ":" + m
	}
	n.Signed = SignedValue(f.Tenant, f.ChallengeID, f.CodeSeq, f.RecipientHash)
	if n.ID == "" {
		// A raw SES record: its feedback id, or the message id and the event type,
		// which one mail reports once each (but for delays, which carry their time).
		n.ID = feedbackID
		if n.ID == "" {
			n.ID = e.Mail.MessageID + ":" + strings.ReplaceAll(typ, " ", "") + ":" + strconv.FormatInt(f.OccurredAt.UnixMilli(), 10)
		}
	}
	if !idPattern(n.ID) {
		return n, &Error{ReasonBadTag, "notification id is not a token"}
	}
	n.Event = f
	return n, nil
}

// decodeEnvelope reads a queue message body as an SNS envelope; a raw SES record gives
// one without a Type.
func decodeEnvelope(body []byte) (snsEnvelope, error) {
	var env snsEnvelope
	if len(body) > maxBody {
		return env, &Error{ReasonMalformed, fmt.Sprintf("body of %d bytes, more than %d", len(body), maxBody)}
	}
	if err := json.Unmarshal(body, &env); err != nil {
		return env, &Error{ReasonMalformed, "body is not a JSON object"}
	}
	return env, nil
}

// readTags fills the code's identity from the message tags: the tenant, the challenge id
// and the code sequence, required, and the recipient's subject hash, when set.
func readTags(tags map[string][]string, f *events.Feedback) error {
	get := func(k string) string { return firstTag(tags, k) }
	tenant, challenge, seq := get(TagTenant), get(TagChallenge), get(TagCodeSeq)
	hash := ""
	if k, h := get(TagRecipientKey), get(TagRecipientHash); k != "" || h != "" {
		id, err := base64.RawURLEncoding.DecodeString(k)
		if err != nil {
			return &Error{ReasonBadTag, "recipient_key tag is not base64url"}
		}
		hash = string(id) + ":" + h
	}
	if tenant == "" && challenge == "" {
		return ErrNotOurs
	}
	switch {
	case !events.ValidTenant(tenant):
		return &Error{ReasonBadTag, "tenant tag is not a tenant"}
	case !events.IsUUID(challenge):
		return &Error{ReasonBadTag, "challenge_id tag is not a UUID"}
	}
	n, err := strconv.Atoi(seq)
	if err != nil || n < 1 || n > 1000 {
		return &Error{ReasonBadTag, "code_seq tag is not a code sequence"}
	}
	if hash != "" && !events.IsSubjectHash(hash) {
		return &Error{ReasonBadTag, "recipient_hash tag is not a subject hash"}
	}
	f.Tenant, f.ChallengeID, f.CodeSeq, f.RecipientHash = tenant, challenge, n, hash
	return nil
}

func firstTag(tags map[string][]string, k string) string {
	if v := tags[k]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// diagnostic is a status and the receiving server's text, made fit to leave the
// service: every address and IP redacted, at most 500 bytes.
func diagnostic(status, text string) string {
	return events.Reason(strings.TrimSpace(strings.TrimSpace(status)+" "+strings.TrimSpace(text)), 500)
}

// token keeps a short word of SES's vocabulary (Permanent, MailboxFull) and drops
// anything else.
func token(s string) string {
	if len(s) > 64 {
		return ""
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == ' ') {
			return ""
		}
	}
	return s
}

// quoteToken names an unknown type in an error without quoting arbitrary text.
func quoteToken(s string) string {
	if t := token(s); t != "" {
		return fmt.Sprintf("%q", t)
	}
	return "(not a word)"
}

// idPattern is a notification id that can go into a Nats-Msg-Id.
func idPattern(s string) bool {
	if s == "" || len(s) > 200 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_:.", r)) {
			return false
		}
	}
	return true
}

// NewSQSClient builds the SQS client that reads the feedback queue: credentials from the
// standard AWS chain, region (OTP_SES_REGION, else AWS_REGION), and endpoint, when set, an
// emulator or a VPC endpoint (OTP_SQS_ENDPOINT).
func NewSQSClient(ctx context.Context, region, endpoint string) (*sqs.Client, error) {
	var opts []func(*awsconfig.LoadOptions) error
	if region != "" {
		opts = append(opts, awsconfig.WithRegion(region))
	}
	cfg, err := awsconfig.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("load AWS config: %w", err)
	}
	if cfg.Region == "" {
		return nil, errors.New("no region: set OTP_SES_REGION or AWS_REGION")
	}
	return sqs.NewFromConfig(cfg, func(o *sqs.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
	}), nil
}
