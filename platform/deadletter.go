package platform

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
)

// Dead letters: a message a consumer gives up on is copied to otp.dlq.<tenant> sealed
// whole (events.SealedDeadLetter) under the DLQ key ring, OTP_DLQ_KEY, which every
// service that consumes needs. Outside the seal it carries only the reason, its origin
// and the subject hash of the person it is about (events.HeaderRecipientHash), so that an
// operator can triage and an erasure can find a person's dead letters without opening
// them. OpenDeadLetter gives the original back, for a redrive.

// ErrNoDLQKey is returned when a consumer has no DLQ key to seal a dead letter with: it
// never writes one in the clear.
var ErrNoDLQKey = errors.New("no DLQ key (OTP_DLQ_KEY): a dead letter is never written in the clear")

// DeadLetters is how a consumer writes its dead letters.
type DeadLetters struct {
	// Sealer seals them (OTP_DLQ_KEY); required.
	Sealer *keys.Sealer
	// Recipient returns the subject hash of the person a message of tenant is about, or
	// "" when it names none or cannot be read. Nil: no recipient hash header.
	Recipient func(tenant string, data []byte) string
}

// LoadDLQKey reads OTP_DLQ_KEY: AES-256 keys, "id:base64,…" with the active key first,
// exactly 32 bytes each. Keep a retired key in the ring while dead letters sealed under it
// are kept (OTP_DLQ's 30 days).
func LoadDLQKey(getenv Getenv) (*keys.Sealer, error) {
	s, err := keys.ParseSealer(getenv("OTP_DLQ_KEY"))
	if err != nil {
		return nil, &ConfigError{"OTP_DLQ_KEY", err.Error()}
	}
	return s, nil
}

// RequestRecipient finds the recipient of an otp.requested body: its "recipient" field,
// hashed under the active subject key. A body too broken to hold one has none.
func RequestRecipient(subjects *keys.Subjects) func(tenant string, data []byte) string {
	return func(tenant string, data []byte) string {
		var v struct {
			Recipient string `json:"recipient"`
		}
		if subjects == nil || json.Unmarshal(data, &v) != nil || v.Recipient == "" {
			return ""
		}
		return subjects.Subject(tenant, v.Recipient)
	}
}

// EventRecipient finds the recipient of an OTP_EVENTS or OTP_CHALLENGES body: its
// "recipient_hash" field, a subject hash already, or the first of its "recipient_hashes"
// (an otp.challenge: the active key's), or else (events written before recipients were
// hashed) its "recipient" field, hashed under the active subject key when subjects is set.
func EventRecipient(subjects *keys.Subjects) func(tenant string, data []byte) string {
	return func(tenant string, data []byte) string {
		var v struct {
			RecipientHash   string   `json:"recipient_hash"`
			RecipientHashes []string `json:"recipient_hashes"`
			Recipient       string   `json:"recipient"`
		}
		if json.Unmarshal(data, &v) != nil {
			return ""
		}
		switch {
		case v.RecipientHash != "":
			return v.RecipientHash
		case len(v.RecipientHashes) > 0 && events.IsSubjectHash(v.RecipientHashes[0]):
			return v.RecipientHashes[0]
		case v.Recipient != "" && subjects != nil:
			return subjects.Subject(tenant, v.Recipient)
		}
		return ""
	}
}

// sealDeadLetter builds the dead letter of the message (subject, header, data) stored at
// stream/seq that consumer gave up on: the original sealed whole in the body, the reason,
// consumer, origin and recipient hash in headers.
func (dls *DeadLetters) sealDeadLetter(consumer, tenant, subject string, header nats.Header, data []byte, md Meta, reason string) (*nats.Msg, error) {
	if dls == nil || dls.Sealer == nil {
		return nil, ErrNoDLQKey
	}
	var rcpt string
	if !events.ValidTenant(tenant) {
		tenant = "_unknown" // and nobody's: a hash is scoped by a tenant
	} else if dls.Recipient != nil {
		rcpt = dls.Recipient(tenant, data)
	}
	orig := events.DeadLetter{Subject: subject, Data: data}
	if len(header) > 0 {
		orig.Header = map[string][]string(header)
	}
	sealed, err := dls.Sealer.SealDeadLetter(tenant, md.Stream, md.Sequence, rcpt, orig)
	if err != nil {
		return nil, fmt.Errorf("seal dead letter: %w", err)
	}
	body, err := json.Marshal(sealed)
	if err != nil {
		return nil, err
	}
	dl := nats.NewMsg(events.TypeDLQ.Subject(tenant))
	dl.Data = body
	dl.Header = nats.Header{}
	dl.Header.Set(jetstream.MsgIDHeader, DeadLetterID(md.Stream, md.Sequence, consumer))
	// The reason may quote a provider or a decoder: no address or IP leaves in it.
	dl.Header.Set(events.HeaderDLQReason, events.Reason(reason, 1000))
	dl.Header.Set(events.HeaderDLQSubject, subject)
	dl.Header.Set(events.HeaderDLQConsumer, consumer)
	dl.Header.Set(events.HeaderDLQStream, md.Stream)
	dl.Header.Set(events.HeaderDLQSequence, strconv.FormatUint(md.Sequence, 10))
	dl.Header.Set(events.HeaderDLQDelivered, strconv.FormatUint(md.NumDelivered, 10))
	if rcpt != "" {
		dl.Header.Set(events.HeaderRecipientHash, rcpt)
	}
	return dl, nil
}

// OpenDeadLetter opens a dead letter read from OTP_DLQ (its headers and body) with the
// DLQ key ring and returns the original message. It fails when the body is not a sealed
// dead letter, when its key is not in the ring, or when the body or the headers bound to
// it were changed.
func OpenDeadLetter(sealer *keys.Sealer, header nats.Header, data []byte) (events.DeadLetter, error) {
	sealed, err := events.DecodeSealedDeadLetter(data)
	if err != nil {
		return events.DeadLetter{}, err
	}
	seq, err := strconv.ParseUint(header.Get(events.HeaderDLQSequence), 10, 64)
	if err != nil {
		return events.DeadLetter{}, fmt.Errorf("dead letter: bad %s header", events.HeaderDLQSequence)
	}
	return sealer.OpenDeadLetter(sealed, header.Get(events.HeaderDLQStream), seq, header.Get(events.HeaderRecipientHash))
}

// publishDeadLetter copies d to otp.dlq.<tenant>, sealed.
func (c *Consumer) publishDeadLetter(ctx context.Context, d *Delivery, tenant, reason string) error {
	dl, err := c.cfg.DeadLetters.sealDeadLetter(c.durable, tenant, d.msg.Subject(), d.msg.Headers(), d.msg.Data(), d.meta, reason)
	if err != nil {
		return err
	}
	if _, err := c.cfg.JS.PublishMsg(ctx, dl); err != nil {
		return fmt.Errorf("dead-letter %s: %w", dl.Header.Get(jetstream.MsgIDHeader), err)
	}
	return nil
}

// DeadLetterID is the Nats-Msg-Id of the dead letter of message seq of stream as consumer
// gives it up: "dlq:<stream>:<seq>", so a repeated dead letter of the same message is
// dropped by the stream. On OTP_EVENTS, which several services' durables read, it ends in
// ":<consumer>": a poison event that two readers give up gets a dead letter of each, so the
// one that matters (the auditor's, which a redrive mends) is never dropped as a repeat of
// another reader's.
func DeadLetterID(stream string, seq uint64, consumer string) string {
	if stream == events.StreamEvents {
		return fmt.Sprintf("dlq:%s:%d:%s", stream, seq, consumer)
	}
	return fmt.Sprintf("dlq:%s:%d", stream, seq)
}

// PublishDeadLetterOf copies m, read from stream, to otp.dlq.<tenant>, sealed, as
// consumer gives it up for reason: for a message a consumer holds no delivery of (read
// by sequence). id is its Nats-Msg-Id: DeadLetterID as a delivery's, or more,
// when the message was dead-lettered before and must be again within the duplicate
// window.
func PublishDeadLetterOf(ctx context.Context, js jetstream.JetStream, dls *DeadLetters, consumer, tenant, stream string, m *jetstream.RawStreamMsg, reason, id string) error {
	dl, err := dls.sealDeadLetter(consumer, tenant, m.Subject, m.Header, m.Data,
		Meta{Stream: stream, Sequence: m.Sequence, NumDelivered: 1, Timestamp: m.Time}, reason)
	if err != nil {
		return err
	}
	dl.Header.Set(jetstream.MsgIDHeader, id)
	if _, err := js.PublishMsg(ctx, dl); err != nil {
		return fmt.Errorf("dead-letter %s: %w", id, err)
	}
	return nil
}
