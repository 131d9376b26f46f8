package events

import (
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Stream names.
const (
	StreamRequests = "OTP_REQUESTS"
	StreamDispatch = "OTP_DISPATCH"
	StreamEvents   = "OTP_EVENTS"
	StreamDLQ      = "OTP_DLQ"
	// StreamChallenges is the verifier's own feed: every code of every challenge (its
	// HMAC, attempts, expiry, session) and every supersession, in one order. Kept only as
	// long as a code can live; readable only by the verifier.
	StreamChallenges = "OTP_CHALLENGES"
	// StreamAudit holds the auditor's signed checkpoints of its hash chain, outside
	// PostgreSQL, so that someone who can rewrite the audit tables cannot also rewrite
	// what the chain was seen to hold.
	StreamAudit = "OTP_AUDIT"
	// StreamAdvisories keeps the server's advisories that a consumer of OTP_REQUESTS or
	// OTP_DISPATCH gave a message up after its MaxDeliver deliveries, so that the issuer
	// dead-letters such a request, and the dispatcher runs such a job to its outcome, even
	// when the advisory came while none was connected (IssuerExhaustedConsumer,
	// DispatcherExhaustedConsumer).
	StreamAdvisories = "OTP_ADVISORIES"
)

// MaxDeliveriesAdvisory is the subject on which the server tells that durable of stream
// gave a message up after its MaxDeliver deliveries ("*" for every durable).
func MaxDeliveriesAdvisory(stream, durable string) string {
	return "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + stream + "." + durable
}

// ConsumerIssuerExhausted and ConsumerDispatcherExhausted read OTP_ADVISORIES for the
// issuer and the dispatcher (IssuerExhaustedConsumer, DispatcherExhaustedConsumer).
const (
	ConsumerIssuerExhausted     = "issuer-exhausted"
	ConsumerDispatcherExhausted = "dispatcher-exhausted"
)

// IssuerExhaustedConsumer is the issuer's durable on OTP_ADVISORIES: the advisories that
// one of its durables on OTP_REQUESTS gave a message up after MaxDeliver with none of
// its deliveries settled (the process died on the last, or the JetStream client never
// handed the message over). The issuer reads the message by sequence and dead-letters it
// (platform.RunExhausted).
var IssuerExhaustedConsumer = jetstream.ConsumerConfig{
	Durable:       ConsumerIssuerExhausted,
	Description:   "issuer: dead-letter the requests given up after their deliveries",
	FilterSubject: MaxDeliveriesAdvisory(StreamRequests, "*"),
	AckPolicy:     jetstream.AckExplicitPolicy,
	DeliverPolicy: jetstream.DeliverAllPolicy,
	AckWait:       2 * time.Minute,
	MaxDeliver:    50,
	MaxAckPending: 100,
}

// DispatcherExhaustedConsumer is the dispatcher's durable on OTP_ADVISORIES: the
// advisories that its durable on OTP_DISPATCH gave a job up after MaxDeliver with none of
// its deliveries settled (a dispatcher died on the last). The dispatcher reads the job by
// sequence and runs it once more, as its last delivery, to its terminal event, then
// deletes it from the work queue (platform.Consumer.Redelivered).
var DispatcherExhaustedConsumer = jetstream.ConsumerConfig{
	Durable:       ConsumerDispatcherExhausted,
	Description:   "dispatcher: run the jobs given up after their deliveries to their outcome",
	FilterSubject: MaxDeliveriesAdvisory(StreamDispatch, ConsumerDispatcher),
	AckPolicy:     jetstream.AckExplicitPolicy,
	DeliverPolicy: jetstream.DeliverAllPolicy,
	AckWait:       2 * time.Minute,
	MaxDeliver:    50,
	MaxAckPending: 100,
}

// SubjectAuditCheckpoint is where the auditor publishes an AuditCheckpoint, with the
// position as Nats-Msg-Id.
const SubjectAuditCheckpoint = "otp.audit.checkpoint"

// AuditCheckpoint is a signed statement of the audit chain's head: the row at chain
// position Pos had hash RowHash (HMAC under chain key ChainKeyID) and stream sequence
// StreamSeq at time At. Signature is Ed25519 under the auditor's signing key SigningKeyID
// over the bytes docs/audit.md defines. At least once, in chain order per auditor; a
// repeat has the same Nats-Msg-Id and the same content.
type AuditCheckpoint struct {
	Pos          int64     `json:"pos"`
	RowHash      []byte    `json:"row_hash"`
	StreamSeq    uint64    `json:"stream_seq"`
	ChainKeyID   string    `json:"chain_key_id"`
	At           time.Time `json:"at"`
	SigningKeyID string    `json:"signing_key_id"`
	Signature    []byte    `json:"signature"`
}

// Durable consumer names. Renaming one makes its service read its stream from the start.
const (
	ConsumerIssuer     = "issuer"
	ConsumerDispatcher = "dispatcher"
	ConsumerVerifier   = "verifier"
	ConsumerAuditor    = "auditor"
)

// DuplicateWindow is the publish dedup window of every stream. It covers a publisher that
// crashes between its database commit and its publish and is redelivered its input
// (AckWait × a few deliveries); past it, the consumers' primary keys are the backstop.
const DuplicateWindow = 10 * time.Minute

// MaxCodeTTL is the longest lifetime a code may have; OTP_DISPATCH keeps jobs at least this long.
const MaxCodeTTL = time.Hour

// OTP_REQUESTS keeps a request at most this long (OTP_REQUESTS_MAX_AGE): long enough for
// every code lifetime, so nothing that could still be served ages out, and short, since
// a request holds an address and an IP in the clear. The issuer refuses a request older
// than its code's lifetime (ReasonStale) and alerts when its backlog nears the bound.
const (
	DefaultRequestsMaxAge = time.Hour
	MinRequestsMaxAge     = MaxCodeTTL
	MaxRequestsMaxAge     = 24 * time.Hour
)

// StreamOptions tune the stream configs for a deployment.
type StreamOptions struct {
	// Replicas is 1 on a laptop and 3 in a cluster. Zero means 1.
	Replicas int
	// RequestsMaxAge is how long OTP_REQUESTS keeps a request. Zero means
	// DefaultRequestsMaxAge. Provisioning applies it (otpflow provision); the issuer reads
	// the same setting for its backlog alert.
	RequestsMaxAge time.Duration
	// DispatchMaxDeliver, when positive, is the dispatcher consumer's MaxDeliver in place
	// of DispatcherConsumer's (ConsumerConfigs).
	DispatchMaxDeliver int
	// Tenants, when set, each get a request stream of their own (TenantRequestsStream)
	// that captures otp.requested.<tenant>, and OTP_REQUESTS captures no subject: it
	// sources those streams, and the issuer reads it as before (OTP_TENANT_STREAMS).
	// JetStream checks a publish's Nats-Msg-Id and Nats-Expected-* headers against the
	// whole stream it lands on; on a stream of its own a tenant can neither take another
	// tenant's message id, learn whether one was used, nor read another's last message id,
	// and can fill only its own stream. A tenant not listed then has nowhere to publish:
	// NATS answers its publish with "no responders".
	Tenants []string
	// TenantRequestsMaxBytes bounds each tenant's request stream; past it the tenant's
	// publishes are refused (DiscardNew) and every other tenant's still land
	// (OTP_TENANT_REQUESTS_MAX_BYTES). Zero means DefaultTenantRequestsMaxBytes.
	TenantRequestsMaxBytes int64
}

// DefaultTenantRequestsMaxBytes bounds a tenant's request stream unless
// OTP_TENANT_REQUESTS_MAX_BYTES says otherwise: about 250,000 requests of 1 KiB. The
// server sets a stream's MaxBytes aside from its max_file_store when it creates the
// stream, on every replica: tenants × bound must fit.
const DefaultTenantRequestsMaxBytes = 256 << 20

// TenantRequestsStream names tenant's request stream, "OTP_REQUESTS_<tenant>"
// (StreamOptions.Tenants).
func TenantRequestsStream(tenant string) string { return StreamRequests + "_" + tenant }

// IsRequestsStream reports whether name is OTP_REQUESTS or a tenant's request stream.
func IsRequestsStream(name string) bool {
	t, ok := strings.CutPrefix(name, StreamRequests+"_")
	return name == StreamRequests || ok && ValidTenant(t)
}

// RequestsAge is o.RequestsMaxAge or its default.
func (o StreamOptions) RequestsAge() time.Duration {
	if o.RequestsMaxAge <= 0 {
		return DefaultRequestsMaxAge
	}
	return o.RequestsMaxAge
}

// StreamConfigs returns the configs of the streams of the contract.
func StreamConfigs(o StreamOptions) []jetstream.StreamConfig {
	r := o.Replicas
	if r <= 0 {
		r = 1
	}
	events := make([]string, 0, len(EventTypes))
	for _, t := range EventTypes {
		events = append(events, t.Wildcard())
	}
	challenges := make([]string, 0, len(ChallengeTypes))
	for _, t := range ChallengeTypes {
		challenges = append(challenges, t.Wildcard())
	}
	return append(requestStreams(o, r), []jetstream.StreamConfig{
		{
			// A work queue: a job is deleted once a dispatcher acknowledges or terminates it.
			// It holds the sealed code, so nothing sources or mirrors it.
			Name:        StreamDispatch,
			Description: "dispatch jobs (sealed codes) from the issuer to the dispatchers",
			Subjects:    []string{TypeDispatch.Wildcard()},
			Retention:   jetstream.WorkQueuePolicy,
			MaxAge:      MaxCodeTTL + time.Hour,
			MaxMsgs:     10_000_000,
			Discard:     jetstream.DiscardNew,
			Duplicates:  DuplicateWindow,
			Storage:     jetstream.FileStorage,
			Replicas:    r,
		},
		{
			Name:        StreamEvents,
			Description: "the audit stream: every step of every challenge, no secret",
			Subjects:    events,
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      400 * 24 * time.Hour,
			Duplicates:  DuplicateWindow,
			Storage:     jetstream.FileStorage,
			Compression: jetstream.S2Compression,
			DenyDelete:  true,
			// Readers (the auditor's anchor check, the operator's audit and erase commands)
			// read it in order by batched direct gets rather than through consumers they
			// create: a consumer's configuration names where it delivers, which NATS
			// permissions cannot check (platform.ScanStream, deploy/nats).
			AllowDirect: true,
			DenyPurge:   true,
			Replicas:    r,
		},
		{
			// The code HMACs and session ids live here, not on the audit stream: kept no
			// longer than a code can live, deletable (erasure removes a person's messages
			// by sequence), and nothing sources or mirrors it.
			Name:        StreamChallenges,
			Description: "the verifier's feed: codes (HMAC only) and supersessions of challenges",
			Subjects:    challenges,
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      MaxCodeTTL + time.Hour,
			Duplicates:  DuplicateWindow,
			Storage:     jetstream.FileStorage,
			Replicas:    r,
		},
		{
			Name:        StreamDLQ,
			Description: "messages that exhausted their deliveries or could not be decoded, sealed, with the reason",
			Subjects:    []string{TypeDLQ.Wildcard()},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      30 * 24 * time.Hour,
			Duplicates:  DuplicateWindow,
			Storage:     jetstream.FileStorage,
			// The operator lists it in order by batched direct gets (otpflow dlq list,
			// platform.ScanStream), not one request per entry.
			AllowDirect: true,
			Replicas:    r,
		},
		{
			// Advisories of the server's, not events: only the server publishes them, in
			// the streams' account. Kept a week, far past any restart of the issuer.
			Name:        StreamAdvisories,
			Description: "advisories: messages of OTP_REQUESTS and OTP_DISPATCH given up after their deliveries",
			Subjects:    []string{MaxDeliveriesAdvisory(StreamRequests, "*"), MaxDeliveriesAdvisory(StreamDispatch, "*")},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      7 * 24 * time.Hour,
			MaxBytes:    64 << 20,
			Discard:     jetstream.DiscardOld,
			Duplicates:  DuplicateWindow,
			Storage:     jetstream.FileStorage,
			Replicas:    r,
		},
		{
			// Kept twice as long as OTP_EVENTS, never deleted or purged: a checkpoint must
			// outlive the rows it vouches for.
			Name:        StreamAudit,
			Description: "signed checkpoints of the audit hash chain",
			Subjects:    []string{SubjectAuditCheckpoint},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      800 * 24 * time.Hour,
			Duplicates:  DuplicateWindow,
			Storage:     jetstream.FileStorage,
			DenyDelete:  true,
			DenyPurge:   true,
			Replicas:    r,
		},
	}...)
}

// requestStreams are OTP_REQUESTS and, when o names tenants, their request streams, which
// it sources. Tenant streams come after OTP_REQUESTS: provisioning a deployment that
// turns tenant streams on takes otp.requested.* off OTP_REQUESTS before a tenant's stream
// claims otp.requested.<tenant> (two streams of an account may not share a subject).
func requestStreams(o StreamOptions, r int) []jetstream.StreamConfig {
	requests := jetstream.StreamConfig{
		Name:        StreamRequests,
		Description: "otp.requested events published by upstream apps",
		Subjects:    []string{TypeRequested.Wildcard()},
		Retention:   jetstream.LimitsPolicy,
		MaxAge:      o.RequestsAge(),
		// JetStream refuses a window longer than MaxAge (only a test sets one that short).
		Duplicates: min(DuplicateWindow, o.RequestsAge()),
		Storage:    jetstream.FileStorage,
		Replicas:   r,
		// Apps publish here: one message can be no larger than a request needs (a
		// request above MaxRequestedSize is still stored and rejected as too_large).
		MaxMsgSize: RequestsMaxMsgSize,
	}
	tenants := slices.Clone(o.Tenants)
	slices.Sort(tenants)
	tenants = slices.Compact(tenants)
	if len(tenants) == 0 {
		return []jetstream.StreamConfig{requests}
	}
	shared := requests
	requests.Description = "otp.requested events of every tenant, sourced from the tenants' request streams"
	requests.Subjects = nil
	// No duplicate window: a stream that sources keeps none unless it is given one, and
	// one here would compare the message ids of all tenants again. Each tenant's stream
	// has its own; the issuer knows a message it handled (issuer.resend_messages, by
	// tenant) if sourcing ever repeats one.
	requests.Duplicates = 0
	// The tenant streams bound each message; sourcing adds a Nats-Stream-Source header,
	// so the same bound here would refuse a message its tenant's stream took and stall
	// that tenant's source.
	requests.MaxMsgSize = 0
	maxBytes := o.TenantRequestsMaxBytes
	if maxBytes <= 0 {
		maxBytes = DefaultTenantRequestsMaxBytes
	}
	out := []jetstream.StreamConfig{requests}
	for _, t := range tenants {
		out[0].Sources = append(out[0].Sources, &jetstream.StreamSource{Name: TenantRequestsStream(t)})
		// What the shared stream was, for one tenant: its own duplicate window and
		// message bound, and a bound of its own (a tenant that floods fills its own
		// stream and is refused; the others are not).
		own := shared
		own.Name, own.Subjects = TenantRequestsStream(t), []string{TypeRequested.Subject(t)}
		own.Description = "otp.requested events of tenant " + t + ", sourced into " + StreamRequests
		own.MaxBytes, own.Discard = maxBytes, jetstream.DiscardNew
		out = append(out, own)
	}
	return out
}

// RequestsMaxMsgSize bounds a message on OTP_REQUESTS, where upstream apps publish:
// headers and body, nearly 8 times MaxRequestedSize. It stays 1 KiB below the 64 KiB
// JetStream allows a header block, so that a message a tenant's request stream took
// still fits once sourcing adds its Nats-Stream-Source header (a header block past the
// limit would be refused by OTP_REQUESTS, and stall that tenant's sourcing).
const RequestsMaxMsgSize = 63 << 10

// ErasureConsumer is the durable consumer through which service (issuer, dispatcher,
// verifier) learns of erasures: otp.erasure_requested on OTP_EVENTS, from the start of
// the stream, so an erasure asked while the service was down is done when it returns. The
// auditor reads erasures with everything else, in order.
func ErasureConsumer(service string) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       service + "-erasure",
		Description:   service + ": erase a person on otp.erasure_requested",
		FilterSubject: TypeErasureRequested.Wildcard(),
		AckPolicy:     jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckWait:       30 * time.Second,
		MaxDeliver:    50,
		MaxAckPending: 100,
	}
}

// IssuerFeedbackConsumer is the issuer's durable on OTP_EVENTS for otp.feedback: a
// permanent bounce or a complaint puts the recipient on the tenant's suppression list.
// It starts at the feedback stored after provisioning made it, never at the start of the
// stream: feedback older than the issuer's erasure records could list a person erased
// since, or one an operator took off the list. Once made, it keeps its place, so feedback
// stored while the issuer is down is read when it returns.
var IssuerFeedbackConsumer = jetstream.ConsumerConfig{
	Durable:       ConsumerIssuer + "-feedback",
	Description:   "issuer: suppress recipients on otp.feedback",
	FilterSubject: TypeFeedback.Wildcard(),
	AckPolicy:     jetstream.AckExplicitPolicy,
	DeliverPolicy: jetstream.DeliverNewPolicy,
	AckWait:       30 * time.Second,
	MaxDeliver:    50,
	MaxAckPending: 500,
}

// StatusTypes are the OTP_EVENTS types the verifier's status projection reads
// (VerifierStatusConsumer): what became of each request.
var StatusTypes = []Type{TypeIssued, TypeRejected, TypeSuperseded, TypeDelivered, TypeDeliveryFailed,
	TypeDispatchExpired, TypeVerified, TypeLocked, TypeFeedback, TypeErasureRequested}

// VerifierStatusConsumer is the verifier's durable on OTP_EVENTS for the status
// projection that otp.status answers from.
var VerifierStatusConsumer = jetstream.ConsumerConfig{
	Durable:        ConsumerVerifier + "-status",
	Description:    "verifier: projection of request states for otp.status",
	FilterSubjects: wildcards(StatusTypes),
	AckPolicy:      jetstream.AckExplicitPolicy,
	DeliverPolicy:  jetstream.DeliverAllPolicy,
	AckWait:        30 * time.Second,
	MaxDeliver:     50,
	MaxAckPending:  2000,
}

func wildcards(types []Type) []string {
	out := make([]string, len(types))
	for i, t := range types {
		out[i] = t.Wildcard()
	}
	return out
}

// StreamConsumer is one durable consumer of the contract and the stream it reads.
type StreamConsumer struct {
	Stream string
	Config jetstream.ConsumerConfig
}

// ConsumerConfigs are every durable consumer of the contract for o, as provisioning
// creates them: a service binds to its own and creates none. o.DispatchMaxDeliver, when
// positive, replaces the dispatcher's MaxDeliver; o.Tenants gives the issuer a durable
// per tenant (IssuerConsumers).
func ConsumerConfigs(o StreamOptions) []StreamConsumer {
	dc := DispatcherConsumer
	if o.DispatchMaxDeliver > 0 {
		dc.MaxDeliver = o.DispatchMaxDeliver
	}
	var out []StreamConsumer
	for _, ic := range IssuerConsumers(o.Tenants) {
		out = append(out, StreamConsumer{StreamRequests, ic})
	}
	return append(out, []StreamConsumer{
		{StreamDispatch, dc},
		{StreamChallenges, VerifierConsumer},
		{StreamEvents, VerifierLegacyConsumer},
		{StreamEvents, AuditorConsumer},
		{StreamEvents, ErasureConsumer(ConsumerIssuer)},
		{StreamEvents, ErasureConsumer(ConsumerDispatcher)},
		{StreamEvents, ErasureConsumer(ConsumerVerifier)},
		{StreamEvents, IssuerFeedbackConsumer},
		{StreamEvents, VerifierStatusConsumer},
		{StreamAdvisories, IssuerExhaustedConsumer},
		{StreamAdvisories, DispatcherExhaustedConsumer},
	}...)
}

// IssuerConsumers are the issuer's durable consumers on OTP_REQUESTS: IssuerConsumer,
// which reads every tenant's requests in the order they were stored, or, when tenants
// have request streams of their own (StreamOptions.Tenants), one per tenant
// (IssuerTenantConsumer), so that a tenant's backlog is read beside every other
// tenant's requests rather than ahead of them.
func IssuerConsumers(tenants []string) []jetstream.ConsumerConfig {
	tenants = slices.Clone(tenants)
	slices.Sort(tenants)
	tenants = slices.Compact(tenants)
	if len(tenants) == 0 {
		return []jetstream.ConsumerConfig{IssuerConsumer}
	}
	out := make([]jetstream.ConsumerConfig, 0, len(tenants))
	for _, t := range tenants {
		out = append(out, IssuerTenantConsumer(t))
	}
	return out
}

// IssuerTenantConsumer is the issuer's durable for tenant's requests on OTP_REQUESTS,
// "issuer_<tenant>": IssuerConsumer filtered on otp.requested.<tenant>.
func IssuerTenantConsumer(tenant string) jetstream.ConsumerConfig {
	c := IssuerConsumer
	c.Durable = ConsumerIssuer + "_" + tenant
	c.Description = "issuer: otp.requested." + tenant + " -> challenge"
	c.FilterSubject = TypeRequested.Subject(tenant)
	return c
}

// IsIssuerConsumer reports whether name is one of the issuer's durables on
// OTP_REQUESTS: IssuerConsumer's or a tenant's (IssuerTenantConsumer).
func IsIssuerConsumer(name string) bool {
	t, ok := strings.CutPrefix(name, ConsumerIssuer+"_")
	return name == ConsumerIssuer || ok && ValidTenant(t)
}

// Consumer configs of the four services. MaxDeliver is set on every one: a message that
// keeps failing goes to OTP_DLQ instead of being redelivered forever.
var (
	IssuerConsumer = jetstream.ConsumerConfig{
		Durable:       ConsumerIssuer,
		Description:   "issuer: otp.requested -> challenge",
		FilterSubject: TypeRequested.Wildcard(),
		AckPolicy:     jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckWait:       30 * time.Second,
		MaxDeliver:    10,
		MaxAckPending: 2000,
	}
	DispatcherConsumer = jetstream.ConsumerConfig{
		Durable:       ConsumerDispatcher,
		Description:   "dispatcher: dispatch jobs -> mail providers",
		FilterSubject: TypeDispatch.Wildcard(),
		AckPolicy:     jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		// Longer than one whole pass over the provider chain; workers also signal
		// InProgress while they send, so a slow provider never causes a redelivery.
		AckWait:       60 * time.Second,
		MaxDeliver:    12,
		MaxAckPending: 2000,
	}
	// VerifierConsumer is the verifier's projection of OTP_CHALLENGES.
	VerifierConsumer = jetstream.ConsumerConfig{
		Durable:        ConsumerVerifier,
		Description:    "verifier: projection of challenges and their supersession",
		FilterSubjects: []string{TypeChallenge.Wildcard(), TypeChallengeSuperseded.Wildcard()},
		AckPolicy:      jetstream.AckExplicitPolicy,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		AckWait:        30 * time.Second,
		MaxDeliver:     50,
		MaxAckPending:  2000,
	}
	// VerifierLegacyConsumer is the verifier's consumer of earlier releases, on
	// OTP_EVENTS, unchanged so that it resumes where it stopped: for one release it still
	// projects the otp.issued events that carry a code HMAC (issued before the upgrade) and
	// otp.superseded, so codes alive across the upgrade keep verifying. The next release
	// deletes it.
	VerifierLegacyConsumer = jetstream.ConsumerConfig{
		Durable:        ConsumerVerifier,
		Description:    "verifier: projection of issued and superseded challenges",
		FilterSubjects: []string{TypeIssued.Wildcard(), TypeSuperseded.Wildcard()},
		AckPolicy:      jetstream.AckExplicitPolicy,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		AckWait:        30 * time.Second,
		MaxDeliver:     50,
		MaxAckPending:  2000,
	}
	AuditorConsumer = jetstream.ConsumerConfig{
		Durable:       ConsumerAuditor,
		Description:   "auditor: every event into the audit log",
		AckPolicy:     jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckWait:       30 * time.Second,
		MaxDeliver:    50,
		MaxAckPending: 2000,
	}
)

// HeaderStreamSource is the header JetStream sets on a message it sourced from another
// stream: "<stream> <sequence> …" of the original (it replaces one a publisher set).
const HeaderStreamSource = "Nats-Stream-Source"

// RequestMessageIdentity names a request message on OTP_REQUESTS whatever its delivery,
// so the issuer can tell a message it handled from a new one (a resend's request id is
// shared by every resend of the request): the original's Nats-Msg-Id as a redrive from
// OTP_DLQ names it (HeaderRedriveOf), else its own Nats-Msg-Id, else, for a message
// OTP_REQUESTS sourced from a tenant's request stream, "<that stream>:<its sequence
// there>:<that stream's identity>" (the same if sourcing ever stored it twice), else
// "OTP_REQUESTS:<seq>". A
// redelivery carries the same headers and sequence; `otpflow dlq redrive` names an
// id-less original by this function of its headers and dead-lettered sequence, and a
// redrive of a redriven message keeps the first Otp-Redrive-Of. Identities are compared
// within a tenant only.
func RequestMessageIdentity(h nats.Header, seq uint64) string {
	if id := h.Get(HeaderRedriveOf); id != "" {
		return id
	}
	if id := h.Get(jetstream.MsgIDHeader); id != "" {
		return id
	}
	// "<stream> <seq> <filter> <transform> <subject> [<stream's identity>]": the identity
	// tells a stream deleted and made again, whose sequences start over, from the first.
	if f := strings.Fields(h.Get(HeaderStreamSource)); len(f) >= 2 && IsRequestsStream(f[0]) && f[0] != StreamRequests {
		if n, err := strconv.ParseUint(f[1], 10, 64); err == nil && n > 0 {
			if len(f) >= 6 {
				return f[0] + ":" + f[1] + ":" + f[5]
			}
			return f[0] + ":" + f[1]
		}
	}
	return StreamRequests + ":" + strconv.FormatUint(seq, 10)
}
