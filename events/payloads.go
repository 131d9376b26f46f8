package events

import (
	"encoding/json"
	"strconv"
	"time"
)

// Requested is the body of otp.requested.<tenant>, published by upstream apps (any
// language) onto OTP_REQUESTS. At-least-once: request_id is the app's idempotency key and
// the challenge is (tenant, request_id), so publishing the same request twice sends one
// mail unless the second carries Resend. Decode it with DecodeRequested.
type Requested struct {
	// RequestID is the app's idempotency key: 1-128 visible ASCII characters.
	RequestID string `json:"request_id" jsonschema:"minLength=1,maxLength=128,pattern=^[!-~]{1\\,128}$"`
	// Recipient is one bare email address (no display name).
	Recipient string `json:"recipient" jsonschema:"minLength=3,maxLength=254,format=email"`
	// Purpose names what the code is for, e.g. "login": 1-32 of [a-z0-9_.-].
	Purpose string `json:"purpose" jsonschema:"minLength=1,maxLength=32,pattern=^[a-z0-9_.-]{1\\,32}$"`
	// Locale picks the mail template, e.g. "en" or "pt-BR"; empty means the tenant default.
	Locale string `json:"locale,omitempty" jsonschema:"maxLength=35,pattern=^[A-Za-z]{2\\,3}(-[A-Za-z0-9]{2\\,8})*$"`
	// TTLSeconds is the code lifetime; 0 means the default (300).
	TTLSeconds int `json:"ttl_seconds,omitempty" jsonschema:"minimum=0,maximum=3600"`
	// Resend asks for a fresh code on an existing challenge.
	Resend   bool              `json:"resend,omitempty"`
	Context  RequestContext    `json:"context,omitzero"`
	Metadata map[string]string `json:"metadata,omitempty" jsonschema:"maxProperties=16"`
}

// RequestContext describes the end user's client. It feeds rate limits and risk rules and
// lets a code be bound to a session.
type RequestContext struct {
	IP        string `json:"ip,omitempty" jsonschema:"maxLength=45"`
	UserAgent string `json:"user_agent,omitempty" jsonschema:"maxLength=512"`
	SessionID string `json:"session_id,omitempty" jsonschema:"maxLength=128"`
}

// DispatchJob is what the issuer asserts to the dispatchers about one code: who gets it,
// for what, until when, and the code itself. It never travels in the clear: the body of
// otp.dispatch.<tenant> is a SealedDispatch holding this struct as JSON, sealed whole with
// AES-256-GCM, so nobody who can read or write OTP_DISPATCH learns the code or the address,
// or can redirect, re-time or renumber a job. At-least-once; the message id is
// "dispatch:<challenge>:<seq>".
type DispatchJob struct {
	ChallengeID string    `json:"challenge_id"`
	Tenant      string    `json:"tenant"`
	RequestID   string    `json:"request_id"`
	CodeSeq     int       `json:"code_seq"`
	Recipient   string    `json:"recipient"`
	Purpose     string    `json:"purpose"`
	Locale      string    `json:"locale,omitempty"`
	IssuedAt    time.Time `json:"issued_at"`
	ExpiresAt   time.Time `json:"expires_at"`
	Code        string    `json:"code"`
}

// DispatchFormat names the sealed dispatch format. A body without it (the unsealed jobs of
// earlier releases) is refused: drain OTP_DISPATCH before upgrading.
const DispatchFormat = "otpflow.dispatch.sealed.v2"

// SealedDispatch is the wire body of otp.dispatch.<tenant>. Only what routes the message and
// names the key stays outside the seal, and all of it is bound to the ciphertext as
// associated data (DispatchAD): changing the tenant, the key id or the format makes the
// job fail to open.
type SealedDispatch struct {
	Format    string `json:"format"`
	Tenant    string `json:"tenant"`
	SealKeyID string `json:"seal_key_id"`
	// Sealed is nonce ‖ AES-256-GCM(DispatchJob as JSON).
	Sealed []byte `json:"sealed"`
}

// DispatchAD is the associated data that binds a sealed job to its routing fields.
func DispatchAD(format, tenant, keyID string) []byte {
	return []byte(format + "\x00" + tenant + "\x00" + keyID)
}

// Issued is the body of otp.issued.<tenant> on OTP_EVENTS: a challenge got a code. It is
// what the audit keeps of issuance, so it holds no secret and no plaintext personal data:
// the recipient only as its subject hash and a masked form, the client only as its hash;
// no code HMAC and no session id (the verifier learns those from otp.challenge on
// OTP_CHALLENGES). One per (challenge, code_seq); the id is "issued:<challenge>:<seq>".
//
// Producers stopped writing Recipient, CodeHMAC, PepperKeyID, SessionID and ClientIP in
// this release; decoders still read them, from events stored by an earlier issuer, for
// one release.
type Issued struct {
	ChallengeID string `json:"challenge_id"`
	Tenant      string `json:"tenant"`
	RequestID   string `json:"request_id"`
	CodeSeq     int    `json:"code_seq"`
	// RecipientHash is the recipient's subject hash under the issuer's active
	// OTP_SUBJECT_KEY key, "id:base64url" (keys.Subjects), the one identity of a person.
	RecipientHash string `json:"recipient_hash,omitempty"`
	// RecipientMasked shows the first character of the local part and the domain,
	// "a***@example.com" (MaskAddress).
	RecipientMasked string `json:"recipient_masked,omitempty"`
	// ClientHash is the client network's hash under the same key, when the request named
	// an IP (keys.Subjects.Client).
	ClientHash  string    `json:"client_hash,omitempty"`
	Purpose     string    `json:"purpose"`
	Locale      string    `json:"locale,omitempty"`
	CodeLength  int       `json:"code_length"`
	MaxAttempts int       `json:"max_attempts"`
	Resend      bool      `json:"resend,omitempty"`
	IssuedAt    time.Time `json:"issued_at"`
	ExpiresAt   time.Time `json:"expires_at"`
	// RequestedAt is when the otp.requested message was stored on OTP_REQUESTS.
	RequestedAt time.Time `json:"requested_at,omitzero"`
	// Test marks a test recipient of the tenant policy: a fixed code, never mailed.
	Test bool `json:"test,omitempty"`
	// Risk names the adaptive rules that shortened this code's lifetime or attempts.
	Risk []string `json:"risk,omitempty"`

	// Deprecated: the plaintext address, written by issuers before RecipientHash; read
	// for one release, never written.
	Recipient string `json:"recipient,omitempty" jsonschema:"description=Deprecated: no longer written; read for one release." jsonschema_extras:"deprecated=true"`
	// Deprecated: the code's HMAC now travels only on OTP_CHALLENGES (Challenge); read
	// for one release, never written.
	CodeHMAC []byte `json:"code_hmac,omitempty" jsonschema:"description=Deprecated: no longer written; read for one release." jsonschema_extras:"deprecated=true"`
	// Deprecated: see CodeHMAC.
	PepperKeyID string `json:"pepper_key_id,omitempty" jsonschema:"description=Deprecated: no longer written; read for one release." jsonschema_extras:"deprecated=true"`
	// Deprecated: the session binding now travels only on OTP_CHALLENGES; read for one
	// release, never written.
	SessionID string `json:"session_id,omitempty" jsonschema:"description=Deprecated: no longer written; read for one release." jsonschema_extras:"deprecated=true"`
	// Deprecated: the plaintext client IP, replaced by ClientHash; read for one release,
	// never written.
	ClientIP string `json:"client_ip,omitempty" jsonschema:"description=Deprecated: no longer written; read for one release." jsonschema_extras:"deprecated=true"`
}

// Legacy reports whether e came from an issuer of an earlier release: it carries the
// code HMAC, which the verifier of this release still projects from OTP_EVENTS.
func (e Issued) Legacy() bool { return len(e.CodeHMAC) > 0 }

// Challenge is the body of otp.challenge.<tenant> on OTP_CHALLENGES: one code of a
// challenge, with everything the verifier needs to check it. Only the verifier reads it.
// It carries the code only as HMAC-SHA256(pepper, challenge_id ‖ 0 ‖ code) under the
// pepper PepperKeyID. The issuer publishes it in the same order as the challenge's
// supersession (otp.challenge_superseded on the same stream). At-least-once; one per
// (challenge, code_seq); the id is "challenge:<challenge>:<seq>".
type Challenge struct {
	ChallengeID string `json:"challenge_id"`
	Tenant      string `json:"tenant"`
	RequestID   string `json:"request_id"`
	CodeSeq     int    `json:"code_seq"`
	CodeLength  int    `json:"code_length"`
	CodeHMAC    []byte `json:"code_hmac"`
	PepperKeyID string `json:"pepper_key_id"`
	MaxAttempts int    `json:"max_attempts"`
	// SessionID binds the code to the session that asked for it: it verifies only with it.
	SessionID string `json:"session_id,omitempty"`
	// RecipientHashes are the recipient's subject hashes under every key of the issuer's
	// OTP_SUBJECT_KEY ring, active first: the verifier's per-recipient failure cap finds
	// state written under an older key.
	RecipientHashes []string  `json:"recipient_hashes"`
	Resend          bool      `json:"resend,omitempty"`
	IssuedAt        time.Time `json:"issued_at"`
	ExpiresAt       time.Time `json:"expires_at"`
	// Test marks a test recipient of the tenant policy: a fixed code, never mailed.
	Test bool `json:"test,omitempty"`
	// Risk names the adaptive rules that shortened this code's lifetime or attempts.
	Risk []string `json:"risk,omitempty"`
}

// RejectReason says why a request was refused. The values are part of the contract.
type RejectReason string

// Reject reasons.
const (
	ReasonMalformedJSON    RejectReason = "malformed_json"
	ReasonTooLarge         RejectReason = "too_large"
	ReasonUnknownField     RejectReason = "unknown_field"
	ReasonMissingField     RejectReason = "missing_field"
	ReasonInvalidField     RejectReason = "invalid_field"
	ReasonHeaderInjection  RejectReason = "header_injection"
	ReasonInvalidRecipient RejectReason = "invalid_recipient"
	ReasonInvalidTenant    RejectReason = "invalid_tenant"
	// ReasonRateLimited refuses a request that came too soon or too often; the event
	// carries RetryAfterSeconds.
	ReasonRateLimited RejectReason = "rate_limited"
	// ReasonChallengeClosed refuses a resend for a challenge that was superseded.
	ReasonChallengeClosed RejectReason = "challenge_closed"
	// ReasonRisk refuses a request an adaptive risk rule flags; the event carries
	// RetryAfterSeconds and the rule in Limit.
	ReasonRisk RejectReason = "risk"
	// ReasonPolicy refuses a request the tenant policy does not allow (a purpose, a lifetime).
	ReasonPolicy RejectReason = "policy"
	// ReasonChallengeMismatch refuses a repeated request_id whose recipient or purpose
	// differs from its challenge's: a challenge's code only ever goes to its own address.
	ReasonChallengeMismatch RejectReason = "challenge_mismatch"
	// ReasonStale refuses a request that waited on OTP_REQUESTS longer than the lifetime
	// its code would get (from when the stream stored it): by then the user has given
	// up, and a code mailed now would only confuse. Nothing is mailed and no challenge
	// is made; the event's Detail says how long it waited.
	ReasonStale RejectReason = "stale"
	// ReasonErased refuses a request of a person who was erased (otpflow erase) after
	// OTP_REQUESTS stored the request: it was in flight when the erasure was asked, and
	// the erasure wins. A request stored after the erasure is served as any other.
	ReasonErased RejectReason = "erased"
	// ReasonSuppressed refuses a request for a recipient on the tenant's suppression
	// list: an earlier code to the address bounced for good or was reported as spam
	// (otp.feedback), or an operator put it there (otpflow suppression add). Mailing it
	// again would only hurt the sender's reputation; the app should ask for another
	// address. Limit names why it is listed (bounced, complained, operator).
	ReasonSuppressed RejectReason = "suppressed"
)

// Rejected is the body of otp.rejected.<tenant> on OTP_EVENTS: a request was refused and
// terminated. It never echoes the recipient (the field may be what was wrong). The id is
// "rejected:<stream sequence of the request>".
type Rejected struct {
	Tenant            string       `json:"tenant"`
	RequestID         string       `json:"request_id,omitempty"`
	Reason            RejectReason `json:"reason" jsonschema:"enum=malformed_json,enum=too_large,enum=unknown_field,enum=missing_field,enum=invalid_field,enum=header_injection,enum=invalid_recipient,enum=invalid_tenant,enum=rate_limited,enum=challenge_closed,enum=risk,enum=policy,enum=challenge_mismatch,enum=stale,enum=erased,enum=suppressed"`
	Field             string       `json:"field,omitempty"`
	Detail            string       `json:"detail"`
	RetryAfterSeconds int          `json:"retry_after_seconds,omitempty"`
	// Limit names the rate limit or risk rule that refused a request: recipient_cooldown,
	// recipient_per_hour, ip_per_minute, tenant_per_minute, resend_cooldown, max_sends,
	// ip_fanout; for suppressed, why the recipient is listed: bounced, complained, operator.
	Limit      string    `json:"limit,omitempty"`
	RequestSeq uint64    `json:"request_seq,omitempty"`
	RejectedAt time.Time `json:"rejected_at"`
}

// Superseded is the body of otp.superseded.<tenant> on OTP_EVENTS and of
// otp.challenge_superseded.<tenant> on OTP_CHALLENGES: a newer request for the same
// recipient and purpose replaced this challenge, whose codes no longer verify. The ids are
// "superseded:<challenge>" and "challenge_superseded:<challenge>".
type Superseded struct {
	ChallengeID  string    `json:"challenge_id"`
	Tenant       string    `json:"tenant"`
	RequestID    string    `json:"request_id"`
	SupersededBy string    `json:"superseded_by"`
	SupersededAt time.Time `json:"superseded_at"`
	Test         bool      `json:"test,omitempty"`
}

// Delivered is the body of otp.delivered.<tenant>: a provider accepted the mail of one
// code. The id is "delivered:<challenge>:<seq>", so a redelivered job that was already
// sent re-publishes the same event.
type Delivered struct {
	ChallengeID       string `json:"challenge_id"`
	Tenant            string `json:"tenant"`
	RequestID         string `json:"request_id"`
	CodeSeq           int    `json:"code_seq"`
	Provider          string `json:"provider"`
	ProviderMessageID string `json:"provider_message_id,omitempty"`
	Attempts          int    `json:"attempts"`
	// Unconfirmed is set when the provider took the message but twice gave no final
	// answer: the mail most likely went out, and it is not sent a third time.
	Unconfirmed bool `json:"unconfirmed,omitempty"`
	// ProviderAttempts lists every provider call of this delivery, in order: the
	// retries and the failover that led to the provider above.
	ProviderAttempts []ProviderAttempt `json:"provider_attempts,omitempty"`
	DeliveredAt      time.Time         `json:"delivered_at"`
}

// ProviderAttempt is one call to a mail provider.
type ProviderAttempt struct {
	Provider string `json:"provider"`
	// Outcome is "ok" or the failure class: transient, throttled, quota_exhausted,
	// provider_down, permanent, ambiguous.
	Outcome string    `json:"outcome"`
	At      time.Time `json:"at"`
}

// DeliveryFailed is the body of otp.delivery_failed.<tenant>: the mail of one code could
// not be sent. Permanent failures are final; transient ones are retried and this event is
// published only when the job gives up.
type DeliveryFailed struct {
	ChallengeID string    `json:"challenge_id"`
	Tenant      string    `json:"tenant"`
	RequestID   string    `json:"request_id"`
	CodeSeq     int       `json:"code_seq"`
	Provider    string    `json:"provider,omitempty"`
	Reason      string    `json:"reason"`
	Permanent   bool      `json:"permanent"`
	Attempts    int       `json:"attempts"`
	FailedAt    time.Time `json:"failed_at"`
	// ProviderAttempts lists the provider calls of the last delivery of the job.
	ProviderAttempts []ProviderAttempt `json:"provider_attempts,omitempty"`
}

// Reasons the dispatcher gives when it gives up on a job whose deliveries ran out before a
// final answer: the start of the reason of its otp.delivery_failed (permanent false) and of
// its dead letter's Otp-Dlq-Reason (there after "dispatcher: "), followed by ": " and what
// happened last. Reasons are only ever added.
const (
	// DeliveryReasonExhausted: every provider kept failing for now (unreachable,
	// throttled, held back by its rate limit or circuit breaker) until the job's last
	// delivery; otp.delivery_failed.
	DeliveryReasonExhausted = "deliveries exhausted"
	// DeliveryReasonHeldPastExpiry: on the job's last delivery another dispatcher's claim
	// still held it when its code expired; nothing was sent by this delivery, and the
	// job is reported with otp.dispatch_expired.
	DeliveryReasonHeldPastExpiry = "held past expiry"
)

// DispatchExpired is the body of otp.dispatch_expired.<tenant>: a job was still undelivered
// when its code expired, so it was dropped unsent.
type DispatchExpired struct {
	ChallengeID string    `json:"challenge_id"`
	Tenant      string    `json:"tenant"`
	RequestID   string    `json:"request_id"`
	CodeSeq     int       `json:"code_seq"`
	Attempts    int       `json:"attempts"`
	ExpiresAt   time.Time `json:"expires_at"`
	ExpiredAt   time.Time `json:"expired_at"`
}

// Verified is the body of otp.verified.<tenant>: the right code was presented; the
// challenge is used up. The id is "verified:<challenge>".
type Verified struct {
	ChallengeID string    `json:"challenge_id"`
	Tenant      string    `json:"tenant"`
	RequestID   string    `json:"request_id"`
	CodeSeq     int       `json:"code_seq"`
	Attempts    int       `json:"attempts"`
	VerifiedAt  time.Time `json:"verified_at"`
	Test        bool      `json:"test,omitempty"`
}

// VerifyFailed is the body of otp.verify_failed.<tenant>: a verify call did not succeed;
// Status is the reply the caller got.
type VerifyFailed struct {
	ChallengeID       string       `json:"challenge_id,omitempty"`
	Tenant            string       `json:"tenant"`
	RequestID         string       `json:"request_id"`
	Status            VerifyStatus `json:"status"`
	Attempts          int          `json:"attempts"`
	AttemptsRemaining int          `json:"attempts_remaining"`
	FailedAt          time.Time    `json:"failed_at"`
	Test              bool         `json:"test,omitempty"`
	// Reason explains a failure the code alone does not: "recipient_failures" when the
	// recipient's failed verifications across challenges reached the policy's cap.
	Reason string `json:"reason,omitempty"`
}

// Locked is the body of otp.locked.<tenant>: the challenge used up its verify attempts.
// The id is "locked:<challenge>".
type Locked struct {
	ChallengeID string    `json:"challenge_id"`
	Tenant      string    `json:"tenant"`
	RequestID   string    `json:"request_id"`
	Attempts    int       `json:"attempts"`
	LockedAt    time.Time `json:"locked_at"`
	Test        bool      `json:"test,omitempty"`
}

// FeedbackKind is what a mail provider learned of a sent code after it accepted it.
type FeedbackKind string

// The feedback kinds.
const (
	// FeedbackMailboxDelivered: the recipient's mail server took the mail.
	FeedbackMailboxDelivered FeedbackKind = "mailbox_delivered"
	// FeedbackBounced: the recipient's mail server refused it (BounceType says for good or not).
	FeedbackBounced FeedbackKind = "bounced"
	// FeedbackComplained: the recipient marked it as spam.
	FeedbackComplained FeedbackKind = "complained"
	// FeedbackRejected: the provider took it and then did not send it (a virus, a
	// rendering failure).
	FeedbackRejected FeedbackKind = "rejected"
	// FeedbackDelayed: the provider could not hand it over yet and keeps trying.
	FeedbackDelayed FeedbackKind = "delayed"
)

// Feedback is the body of otp.feedback.<tenant>: what the mail provider reported about a
// mail after it accepted it (an SES event notification), tied to the code it carried by
// the message tags the dispatcher set. The recipient is named only by RecipientHash, the
// subject hash the code was issued under; Diagnostic is the provider's text with every
// address and IP redacted. The id is "feedback:<provider>:<notification id>".
type Feedback struct {
	Tenant      string       `json:"tenant"`
	ChallengeID string       `json:"challenge_id"`
	CodeSeq     int          `json:"code_seq"`
	Kind        FeedbackKind `json:"kind"`
	// RecipientHash is the subject hash (OTP_SUBJECT_KEY, "id:base64url") the dispatcher
	// tagged the mail with: a complaint that comes weeks later still finds its person.
	RecipientHash     string `json:"recipient_hash,omitempty"`
	Provider          string `json:"provider"`
	ProviderMessageID string `json:"provider_message_id"`
	// BounceType is Permanent, Transient or Undetermined; BounceSubType the provider's
	// finer reason (General, NoEmail, Suppressed, MailboxFull, ...).
	BounceType    string `json:"bounce_type,omitempty"`
	BounceSubType string `json:"bounce_sub_type,omitempty"`
	// ComplaintType is the feedback report's type (abuse, fraud, ...), when it has one.
	ComplaintType string `json:"complaint_type,omitempty"`
	// DelayType is the provider's reason for a delay (MailboxFull, TransientCommunicationFailure, ...).
	DelayType string `json:"delay_type,omitempty"`
	// Diagnostic is the receiving server's or the provider's text: the SMTP status and
	// diagnostic code of a bounce or a delay, the reason of a rejection.
	Diagnostic string `json:"diagnostic,omitempty"`
	// SentAt is when the provider took the mail; OccurredAt when the reported event
	// happened; ReceivedAt when otpflow read the notification.
	SentAt     time.Time `json:"sent_at"`
	OccurredAt time.Time `json:"occurred_at"`
	ReceivedAt time.Time `json:"received_at"`
}

// Alert is the body of otp.alert.<tenant>: an anomaly rule fired. Rules about the whole
// deployment use the tenant "_system". Detail is for people and never names an address
// or an IP, not even masked: the person or client network a rule counted is named only
// by SubjectHash.
type Alert struct {
	Tenant    string    `json:"tenant"`
	Rule      string    `json:"rule"`
	Severity  string    `json:"severity"`
	Detail    string    `json:"detail"`
	Value     float64   `json:"value"`
	Threshold float64   `json:"threshold"`
	RaisedAt  time.Time `json:"raised_at"`
	// SubjectHash is the subject hash (OTP_SUBJECT_KEY, "id:base64url") of the recipient
	// or client network the rule counted, when it counted one and the raiser knows it.
	SubjectHash string `json:"subject_hash,omitempty"`
}

// OperatorAction is the body of otp.operator_action.<tenant>: an operator ran a command
// that changed state (audit.erase, audit.purge), and this is what it changed. The tenant
// token is the tenant the action was scoped to, or "_system" for one that is not. The
// command publishes it once, after acting, with the outcome; a command that could not
// publish it exits non-zero saying the action was done but not audited. At-least-once
// within the command's own retries; the id is "operator_action:<random>", one per run.
// Detail names what changed (counts, durations), never an address or another person's
// data.
type OperatorAction struct {
	// Action names the command, e.g. "audit.erase" or "audit.purge".
	Action   string           `json:"action"`
	Identity OperatorIdentity `json:"identity"`
	Tenant   string           `json:"tenant"`
	// Detail is the outcome in a few words, e.g. "3 rows".
	Detail string    `json:"detail"`
	At     time.Time `json:"at"`
	// Redrive is set on a "dlq.redrive" of an OTP_EVENTS dead letter (new in this
	// release): the event it names is handled again by the consumer that gave it up.
	Redrive *RedriveRef `json:"redrive,omitempty"`
}

// RedriveRef names the event a redrive asks a consumer to handle again. An OTP_EVENTS
// dead letter is not published a second time: every reader of the stream would take the
// copy for a new event (a second audit row). The redrive is this reference, on
// otp.operator_action, and the consumer it names reads the original from the stream by
// its sequence, checks that it is the event named, and handles it as it would have: the
// auditor chains its row under the original's sequence once, however often it is asked.
type RedriveRef struct {
	// Stream and StreamSeq are where the original is stored ("OTP_EVENTS").
	Stream    string `json:"stream"`
	StreamSeq uint64 `json:"stream_seq"`
	// EventID is the original's ce-id: a reference whose sequence holds another event is
	// refused.
	EventID string `json:"event_id"`
	// Consumer is the durable consumer that gave the original up, e.g. "auditor".
	Consumer string `json:"consumer"`
	// DLQSeq is the sequence of the dead letter on OTP_DLQ the redrive took it from.
	DLQSeq uint64 `json:"dlq_seq"`
}

// RedriveActionOf returns the reference an otp.operator_action body carries, or nil when it
// is not a "dlq.redrive" with one.
func RedriveActionOf(data []byte) *RedriveRef {
	var a OperatorAction
	if json.Unmarshal(data, &a) != nil || a.Action != ActionDLQRedrive || a.Redrive == nil {
		return nil
	}
	return a.Redrive
}

// Operator actions of `otpflow dlq`.
const (
	ActionDLQRedrive = "dlq.redrive"
	ActionDLQDrop    = "dlq.drop"
)

// OperatorIdentity is who ran an operator command, as the command saw itself: the OS user
// and the host it ran on (both as the operator's machine reports them, so they attest
// nothing against someone who controls that machine), and the NATS user the server
// authenticated when the command connected with credentials.
type OperatorIdentity struct {
	User     string `json:"user"`
	Host     string `json:"host"`
	NATSUser string `json:"nats_user,omitempty"`
}

// ErasureRequested is the body of otp.erasure_requested.<tenant>: an operator asked that
// one person of tenant be erased from every store (otpflow erase). It names the person
// only by their subject hashes (OTP_SUBJECT_KEY) under every key of the ring, so rows
// written before a key rotation are found too. The issuer, dispatcher, verifier and
// auditor each erase what they hold of the person and answer with otp.erased; an audit
// replay erases, from what it rebuilds, every row about the person that came before this
// event on OTP_EVENTS. The id is "erasure:<erasure_id>".
type ErasureRequested struct {
	// ErasureID is a UUID, one per erasure; each otp.erased names it.
	ErasureID       string           `json:"erasure_id"`
	Tenant          string           `json:"tenant"`
	RecipientHashes []string         `json:"recipient_hashes"`
	Identity        OperatorIdentity `json:"identity"`
	// DeletedRequests and DeletedDeadLetters count the person's messages the command
	// deleted from OTP_REQUESTS and OTP_DLQ before it asked the services.
	DeletedRequests    int       `json:"deleted_requests"`
	DeletedDeadLetters int       `json:"deleted_dead_letters"`
	RequestedAt        time.Time `json:"requested_at"`
}

// Erased is the body of otp.erased.<tenant>: Service has erased the person of erasure
// ErasureID from its own store; Rows counts the rows it changed or deleted (0 when it
// held nothing of them, or on a repeat). At least once; the id is
// "erased:<service>:<erasure_id>".
type Erased struct {
	ErasureID string    `json:"erasure_id"`
	Tenant    string    `json:"tenant"`
	Service   string    `json:"service"`
	Rows      int64     `json:"rows"`
	ErasedAt  time.Time `json:"erased_at"`
}

// VerifyStatus is the outcome of a verify call. The values are part of the contract.
type VerifyStatus string

// Verify statuses.
const (
	StatusVerified    VerifyStatus = "verified"
	StatusInvalidCode VerifyStatus = "invalid_code"
	StatusExpired     VerifyStatus = "expired"
	StatusLocked      VerifyStatus = "locked"
	StatusNotFound    VerifyStatus = "not_found"
	StatusAlreadyUsed VerifyStatus = "already_used"
	StatusSuperseded  VerifyStatus = "superseded"
	StatusBadRequest  VerifyStatus = "bad_request"
	// StatusRateLimited: too many verify calls for the tenant or the client IP; the reply
	// carries RetryAfterSeconds. It costs the challenge no attempt.
	StatusRateLimited VerifyStatus = "rate_limited"
)

// VerifyRequest is the request body of otp.verify.<tenant> (NATS request/reply). Decode it
// with DecodeVerifyRequest.
type VerifyRequest struct {
	RequestID string        `json:"request_id" jsonschema:"minLength=1,maxLength=128"`
	Code      string        `json:"code" jsonschema:"minLength=1,maxLength=16"`
	Context   VerifyContext `json:"context,omitzero"`
}

// VerifyContext binds a verify call to the end user's session and names the client, for
// the verify-side rate limits.
type VerifyContext struct {
	SessionID string `json:"session_id,omitempty" jsonschema:"maxLength=128"`
	IP        string `json:"ip,omitempty" jsonschema:"maxLength=45"`
	UserAgent string `json:"user_agent,omitempty" jsonschema:"maxLength=512"`
}

// VerifyReply is the reply of otp.verify.<tenant>. Every outcome, bad_request included,
// comes in this shape. Reason explains a bad_request.
type VerifyReply struct {
	Status            VerifyStatus `json:"status" jsonschema:"enum=verified,enum=invalid_code,enum=expired,enum=locked,enum=not_found,enum=already_used,enum=superseded,enum=bad_request,enum=rate_limited"`
	AttemptsRemaining int          `json:"attempts_remaining"`
	Reason            string       `json:"reason,omitempty"`
	// RetryAfterSeconds comes with rate_limited: when the caller may try again.
	RetryAfterSeconds int `json:"retry_after_seconds,omitempty"`
}

// RequestState is what became of a request, as otp.status answers it. The values are part
// of the contract; only ever added to.
type RequestState string

// Request states.
const (
	// StatePending: a code was issued and is on its way to a provider.
	StatePending RequestState = "pending"
	// StateSent: a provider accepted the mail (otp.delivered).
	StateSent RequestState = "sent"
	// StateMailboxDelivered: the recipient's mail server took it (provider feedback).
	StateMailboxDelivered RequestState = "mailbox_delivered"
	// StateDelayed: the provider could not hand it over yet and keeps trying.
	StateDelayed RequestState = "delayed"
	// StateBounced: the recipient's mail server refused it; the app should ask for
	// another address when Detail.BounceType is Permanent.
	StateBounced RequestState = "bounced"
	// StateComplained: the recipient reported the mail as spam.
	StateComplained RequestState = "complained"
	// StateFailed: the mail could not be sent (otp.delivery_failed), or the provider
	// dropped it after taking it (feedback kind rejected).
	StateFailed RequestState = "failed"
	// StateDispatchExpired: the code expired before any provider took the mail.
	StateDispatchExpired RequestState = "dispatch_expired"
	// StateExpired: the code's lifetime is over and it was never verified.
	StateExpired RequestState = "expired"
	// StateVerified, StateLocked, StateSuperseded: the challenge is closed.
	StateVerified   RequestState = "verified"
	StateLocked     RequestState = "locked"
	StateSuperseded RequestState = "superseded"
	// StateRejected: the request was refused and no challenge was made; Reason says why.
	StateRejected RequestState = "rejected"
)

// StatusRequest is the request body of otp.status.<tenant> (NATS request/reply): what
// became of the request an app published as otp.requested. Decode it with
// DecodeStatusRequest.
type StatusRequest struct {
	RequestID string `json:"request_id" jsonschema:"minLength=1,maxLength=128"`
}

// StatusReply is the reply of otp.status.<tenant>. Found is false for a request id the
// projection has no record of (not yet processed, never sent, or purged after
// OTP_RETENTION); State is then empty. A bad request is answered with Error set.
type StatusReply struct {
	RequestID string       `json:"request_id"`
	Found     bool         `json:"found"`
	State     RequestState `json:"state,omitempty" jsonschema:"enum=pending,enum=sent,enum=mailbox_delivered,enum=delayed,enum=bounced,enum=complained,enum=failed,enum=dispatch_expired,enum=expired,enum=verified,enum=locked,enum=superseded,enum=rejected"`
	// At is when the request reached State (for expired, when the code expired).
	At time.Time `json:"at,omitzero"`
	// Reason is the reject reason of a rejected request; Detail says more about a
	// state: the bounce type and sub-type, the failure reason, the reject detail.
	Reason RejectReason `json:"reason,omitempty"`
	Detail string       `json:"detail,omitempty"`
	// CodeSeq is the challenge's latest code, ExpiresAt when it expires.
	CodeSeq   int       `json:"code_seq,omitempty"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// LastRefusal is the latest refused request for a challenge that lives on (a resend
	// too soon, a mismatched recipient, a suppressed address): reported beside the
	// challenge's state, never instead of it.
	LastRefusal *StatusRefusal `json:"last_refusal,omitempty"`
	// Error explains a request that could not be answered: bad_request (a malformed
	// body), busy (every status slot in use; try again), rate_limited (the tenant's
	// status calls over OTP_STATUS_TENANT_PER_MINUTE), internal (try again).
	Error string `json:"error,omitempty"`
}

// StatusRefusal is a refused request beside a live challenge.
type StatusRefusal struct {
	Reason RejectReason `json:"reason"`
	Detail string       `json:"detail,omitempty"`
	At     time.Time    `json:"at"`
}

// DLQ headers. A dead letter on otp.dlq.<tenant> carries only these headers (and
// Nats-Msg-Id "dlq:<stream>:<seq>", on OTP_EVENTS "dlq:OTP_EVENTS:<seq>:<consumer>"); the original message — subject, headers and body —
// travels sealed in its body (SealedDeadLetter).
const (
	// HeaderDLQReason says why the message was dead-lettered: free text, addresses and IP
	// addresses redacted (Reason), at most 1,000 bytes.
	HeaderDLQReason = "Otp-Dlq-Reason"
	// HeaderDLQStream and HeaderDLQSequence are where the original was stored.
	HeaderDLQStream   = "Otp-Dlq-Stream"
	HeaderDLQSequence = "Otp-Dlq-Sequence"
	// HeaderDLQDelivered is how many times the original had been delivered.
	HeaderDLQDelivered = "Otp-Dlq-Deliveries"
	// HeaderDLQSubject is the subject the original was published to, e.g.
	// "otp.requested.acme": where a redrive publishes it again.
	HeaderDLQSubject = "Otp-Dlq-Subject"
	// HeaderDLQConsumer is the durable consumer that gave up on the original, e.g.
	// "issuer", or "issuer_acme" for tenant acme's requests with tenant request streams
	// (IssuerConsumers): with HeaderDLQStream, whose message it was.
	HeaderDLQConsumer = "Otp-Dlq-Consumer"
	// HeaderRecipientHash is the subject hash (OTP_SUBJECT_KEY, "id:base64url") of the
	// person the original message is about, under the key active when it was
	// dead-lettered; absent when no recipient could be found in it. An erasure finds a
	// person's dead letters by comparing it with the person's hash under every key of the
	// ring.
	HeaderRecipientHash = "Otp-Recipient-Hash"
	// HeaderRedriveOf is set on a message an operator redrove from OTP_DLQ
	// (`otpflow dlq redrive`): the original's Nats-Msg-Id. The redriven message is the
	// original (subject, headers, ce-id and body) under a new Nats-Msg-Id,
	// "redrive:<dlq sequence>:<original id>", so the duplicate window cannot drop it; a
	// consumer recognises the event by its own key (request id, challenge and code), as
	// it recognises a redelivery, except a resend, which the issuer recognises by this
	// header (else the Nats-Msg-Id, else "OTP_REQUESTS:<sequence>"). An original without
	// a Nats-Msg-Id is named "<stream>:<sequence>" from its dead letter; a redriven
	// message redriven again keeps the first original's name.
	HeaderRedriveOf = "Otp-Redrive-Of"
)

// DeadLetterFormat names the sealed dead-letter format.
const DeadLetterFormat = "otpflow.dlq.sealed.v1"

// SealedDeadLetter is the body of otp.dlq.<tenant> on OTP_DLQ: the original message,
// sealed whole with AES-256-GCM under the DLQ key ring (OTP_DLQ_KEY), so that the
// addresses, IPs and sealed codes it may hold do not rest readable for the stream's 30
// days. Only the format, the tenant and the key id stay outside; they are bound to the
// ciphertext as associated data together with the origin and recipient hash headers
// (DeadLetterAD), so a body moved to another entry, or an edited header, fails to open.
type SealedDeadLetter struct {
	Format string `json:"format"`
	Tenant string `json:"tenant"`
	KeyID  string `json:"dlq_key_id"`
	// Sealed is nonce ‖ AES-256-GCM(DeadLetter as JSON).
	Sealed []byte `json:"sealed"`
}

// DeadLetter is the original message a SealedDeadLetter holds: what a redrive publishes
// again.
type DeadLetter struct {
	Subject string              `json:"subject"`
	Header  map[string][]string `json:"header,omitempty"`
	Data    []byte              `json:"data"`
}

// DeadLetterAD is the associated data of a sealed dead letter: its routing fields, its
// origin and its recipient hash header ("" when absent).
func DeadLetterAD(format, tenant, keyID, stream string, seq uint64, recipientHash string) []byte {
	return []byte(format + "\x00" + tenant + "\x00" + keyID + "\x00" + stream + "\x00" + strconv.FormatUint(seq, 10) + "\x00" + recipientHash)
}
