// Package issuer turns otp.requested events into challenges: it validates the request,
// draws a code, stores only its HMAC, and publishes the sealed code to the dispatchers
// (otp.dispatch), the code's HMAC to the verifier (otp.challenge on OTP_CHALLENGES), and
// the challenge without the code, the session or a plaintext address to the audit
// (otp.issued).
package issuer

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/errgroup"
)

// Schema is the PostgreSQL schema the issuer owns.
const Schema = "issuer"

//go:embed migrations/*.sql
var migrationFS embed.FS

// Migrations are the goose migrations of Schema.
func Migrations() fs.FS {
	sub, _ := fs.Sub(migrationFS, "migrations")
	return sub
}

// Config is the issuer's keys and tenant policies.
type Config struct {
	Pepper *keys.Pepper
	// Sealer seals the dispatch job, and a challenge's recipient at rest.
	Sealer *keys.Sealer
	// Subjects hashes recipients and client IPs for every key and column (OTP_SUBJECT_KEY).
	Subjects *keys.Subjects
	// Policies per tenant (OTP_TENANTS_FILE); nil gives every tenant the defaults.
	Policies  *policy.Set
	BatchSize int // requests per transaction; default DefaultBatchSize
	// Retention keeps settled challenges this long after their last code expired
	// (OTP_RETENTION, default 24h).
	Retention time.Duration
	Streams   events.StreamOptions
	// DLQKey seals the requests the issuer dead-letters (OTP_DLQ_KEY); required.
	DLQKey *keys.Sealer
	// LagAlert is the age of the oldest unprocessed request on OTP_REQUESTS that raises
	// the RuleRequestsBacklog alert (OTP_REQUESTS_LAG_ALERT; default half of
	// Streams.RequestsAge(), the stream's bound). LagCheckEvery is how often it is
	// measured (default 10s).
	LagAlert      time.Duration
	LagCheckEvery time.Duration
	// ConsumersCheckEvery is how often the issuer reads again which durables it reads
	// OTP_REQUESTS through (platform.IssuerConsumersNow; default 5s): a tenant
	// provisioning added is read, and a durable it retired is let go, without a restart.
	ConsumersCheckEvery time.Duration
	// Tracer gets an "issue" span per request, whose traceparent the events and the
	// dispatch job it publishes carry; nil records nothing.
	Tracer trace.Tracer
}

// RuleRequestsBacklog is the alert the issuer raises when the oldest request it has not
// processed has waited LagAlert on OTP_REQUESTS: nearing the stream's bound, past which
// requests are deleted unanswered.
const RuleRequestsBacklog = "requests_backlog_age"

// DefaultBatchSize is Config.BatchSize's default (OTP_ISSUER_BATCH).
const DefaultBatchSize = 100

func (c *Config) setDefaults() {
	if c.Policies == nil {
		c.Policies = policy.Defaults()
	}
	if c.BatchSize == 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.Retention == 0 {
		c.Retention = platform.Retention
	}
	if c.LagAlert <= 0 {
		c.LagAlert = c.Streams.RequestsAge() / 2
	}
	if c.LagCheckEvery <= 0 {
		c.LagCheckEvery = 10 * time.Second
	}
	if c.ConsumersCheckEvery <= 0 {
		c.ConsumersCheckEvery = 5 * time.Second
	}
}

// Service is one issuer process. Any number may run; they share the durable consumers.
type Service struct {
	cfg    Config
	store  *store
	js     jetstream.JetStream
	log    *slog.Logger
	reg    prometheus.Registerer
	outbox *outbox.Outbox
	// skew shifts the database clock; tests move time with it. Nil in production.
	skew func() time.Duration

	requests *prometheus.CounterVec
	batch    prometheus.Histogram
	// missing is 1 for a durable OTP_REQUESTS is provisioned with that the issuer cannot
	// bind: its tenant's requests are not read (read.go).
	missing      *prometheus.GaugeVec
	missingShown map[string]bool // the series of missing, kept by the read loop alone
	// suppressed counts recipients listed from feedback, by reason.
	suppressed *prometheus.CounterVec
	// live are the consumers being read, by durable: a message the server gave up while
	// one of them holds it is left to it (readExhausted).
	live sync.Map
}

// New returns an issuer; Run starts it. The schema must be migrated.
func New(cfg Config, pool *pgxpool.Pool, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Service, error) {
	if cfg.Pepper == nil || cfg.Sealer == nil || cfg.Subjects == nil || cfg.DLQKey == nil {
		return nil, errors.New("issuer: pepper, seal key, subject key and DLQ key are required")
	}
	cfg.setDefaults()
	s := &Service{
		cfg: cfg, js: js, log: log, reg: reg,
		// The verifier's stream first: a code's otp.challenge, and the supersession of the
		// code it replaces, are stored before the job that mails it, so the verifier
		// knows both by the time the code can be read (services/verifier/fence.go).
		outbox: &outbox.Outbox{Table: Schema + ".outbox", Pool: pool, JS: js, Log: log, First: challengeSubject},
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_issuer_requests_total", Help: "otp.requested messages handled, by outcome.",
		}, []string{"outcome"}),
		batch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "otpflow_issuer_batch_size", Help: "Requests handled per transaction.",
			Buckets: []float64{1, 2, 5, 10, 20, 50, 100, 200},
		}),
		missing: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "otpflow_issuer_consumer_missing",
			Help: "1 for a durable consumer of the issuer that it cannot bind (issuer_<tenant>: its tenant's requests go unread; issuer-exhausted on OTP_ADVISORIES: given-up requests are not dead-lettered), 0 once bound, by consumer.",
		}, []string{"consumer"}),
		suppressed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_issuer_suppressed_total", Help: "Recipients put on a suppression list from otp.feedback, by reason (bounced, complained).",
		}, []string{"reason"}),
	}
	// The store reads the skew when it reads the clock: tests set it after New.
	s.store = &store{pool: pool, outbox: s.outbox, skew: s.skewBy}
	if reg != nil {
		reg.MustRegister(s.requests, s.batch, s.missing, s.suppressed)
	}
	return s, nil
}

// Run consumes otp.requested until ctx is cancelled, then finishes the batches in hand.
func (s *Service) Run(ctx context.Context) error {
	// The durables OTP_REQUESTS is provisioned with: at least one must be there at start.
	want, err := platform.IssuerConsumersNow(ctx, s.js)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	bound, err := s.bindExisting(ctx, want)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.outbox.Relay(gctx, 2*time.Second, 5*time.Second) })
	g.Go(func() error { return platform.PurgeEvery(gctx, 10*time.Minute, s.log, s.Purge) })
	// With tenant request streams, whether each tenant's requests reach OTP_REQUESTS.
	sources := &platform.SourceWatch{JS: s.js, Log: s.log, Reg: s.reg}
	g.Go(func() error { return sources.Run(gctx) })
	g.Go(func() error { return s.read(gctx, bound) })
	g.Go(func() error { return s.readExhausted(gctx) })
	g.Go(func() error { return s.runFeedback(gctx) })
	g.Go(func() error {
		return platform.RunErasures(gctx, s.js, platform.ErasureConfig{Service: "issuer", Streams: s.cfg.Streams,
			Erase: s.Erase, DeadLetters: &platform.DeadLetters{Sealer: s.cfg.DLQKey}, Log: s.log, Reg: s.reg})
	})
	return g.Wait()
}

// request is one pulled otp.requested message on its way through a batch.
type request struct {
	msg    *platform.Delivery
	seq    uint64
	stored time.Time // when OTP_REQUESTS stored it
	tenant string
	req    events.Requested
	// subjects and clients are the recipient's and the client's hashes under every
	// subject key, active first (identify); clients is nil without context.ip. The
	// client is counted by events.ClientNetwork: spellings of one address and the
	// addresses of one IPv6 /64 are one client.
	subjects, clients []string
	// message is the identity of the message (events.RequestMessageIdentity): a resend is recognised
	// by it, not by its request id.
	message string
	// Set by the decision: reject (publish otp.rejected, terminate) or accept. queued: the
	// rejection went to the outbox with the decision, and is not published here.
	reject  *events.Rejected
	queued  bool
	outcome string
	// span is the request's "issue" span; ctx carries it. traceParent is what the
	// messages published for the request carry: the span's, or without a tracer the
	// request's own (a new trace's when it came without one).
	ctx         context.Context
	span        trace.Span
	traceParent string
}

// handleBatch decides a batch of requests in one transaction. Rejections are published
// and terminated whatever happens to the rest; if the transaction fails, the requests it
// held are left unsettled and the error returned, so the consumer retries them one at a
// time and a poison request cannot hold back its neighbours: one the database refuses
// goes to OTP_DLQ at once, one that keeps failing after its retries, and a database
// outage is waited out (platform.BatchHandler).
func (s *Service) handleBatch(ctx context.Context, batch []*platform.Delivery) error {
	s.batch.Observe(float64(len(batch)))
	// Stamps of rejections only; every decision about time runs on the database clock.
	now := time.Now()
	reqs := make([]*request, 0, len(batch))
	var valid []*request
	for _, d := range batch {
		r := &request{msg: d, seq: d.Meta().Sequence, stored: d.Meta().Timestamp.UTC()}
		r.message = events.RequestMessageIdentity(d.Headers(), r.seq)
		r.ctx, r.span = d.StartSpan(ctx, s.cfg.Tracer, "issue")
		defer r.span.End()
		if r.traceParent = platform.TraceParent(r.ctx); r.traceParent == "" {
			r.traceParent = events.ChildTraceParent(d.Headers().Get(events.HeaderTraceParent))
		}
		reqs = append(reqs, r)
		_, tenant, err := events.SplitSubject(d.Subject())
		if err == nil {
			r.tenant = tenant
			r.req, err = events.DecodeRequested(d.Data())
		}
		if err != nil {
			r.reject = rejection(r, err, now)
			continue
		}
		valid = append(valid, r)
	}

	entries, issueErr := s.issue(ctx, valid)
	if issueErr != nil {
		s.log.Error("issue batch", "requests", len(valid), "err", issueErr)
		issueErr = fmt.Errorf("issue: %w", issueErr)
		for _, r := range valid {
			r.outcome, r.reject, r.queued = "", nil, false
			r.span.SetStatus(codes.Error, "issue failed")
		}
	} else if err := s.outbox.Publish(ctx, entries); err != nil {
		// Committed: the relay publishes the rows later under the same ids.
		s.log.Warn("publish after commit; the outbox relay will retry", "err", err)
	}

	var rejected []*nats.Msg
	for _, r := range reqs {
		if r.reject == nil || r.queued {
			continue
		}
		m, err := events.NewMsg(events.TypeRejected, rejectTenant(r), fmt.Sprintf("rejected:%d", r.seq), "", r.reject, s.envelope(r, now))
		if err == nil {
			rejected = append(rejected, m)
		}
	}
	pubErr := platform.PublishAll(ctx, s.js, rejected)
	if pubErr != nil {
		pubErr = fmt.Errorf("publish rejections: %w", pubErr)
	}
	for _, r := range reqs {
		// No request id: the app chooses it, and it may spell a person.
		r.span.SetAttributes(attribute.String("otpflow.tenant", r.tenant))
		switch {
		case r.reject != nil && pubErr != nil:
			// Left unsettled: retried with the error below.
			r.span.SetStatus(codes.Error, "publish rejection failed")
		case r.reject != nil:
			r.span.SetAttributes(attribute.String("otpflow.outcome", "rejected"), attribute.String("otpflow.reject_reason", string(r.reject.Reason)))
			s.requests.WithLabelValues("rejected").Inc()
			s.log.Info("request rejected", "tenant", r.reject.Tenant, "request_id", r.reject.RequestID,
				"reason", r.reject.Reason, "field", r.reject.Field, "seq", r.seq)
			r.msg.Settle(platform.Terminate(string(r.reject.Reason)))
		case r.outcome != "":
			r.span.SetAttributes(attribute.String("otpflow.outcome", r.outcome))
			s.requests.WithLabelValues(r.outcome).Inc()
			r.msg.Settle(platform.Ack())
		}
	}
	return errors.Join(issueErr, pubErr)
}

func rejectTenant(r *request) string {
	if r.tenant != "" {
		return r.tenant
	}
	return "_invalid"
}

func rejection(r *request, err error, now time.Time) *events.Rejected {
	rej := &events.Rejected{Tenant: rejectTenant(r), RequestID: r.req.RequestID, RequestSeq: r.seq, RejectedAt: now.UTC()}
	var ve *events.ValidationError
	if errors.As(err, &ve) {
		rej.Reason, rej.Field, rej.Detail = ve.Reason, ve.Field, ve.Detail
	} else {
		rej.Reason, rej.Detail = events.ReasonMalformedJSON, "cannot decode"
	}
	return rej
}

// envelope is that of what the issuer publishes for r: in r's "issue" span, so every
// event and the dispatch job of one request are in one trace.
func (s *Service) envelope(r *request, now time.Time) events.Envelope {
	return events.Envelope{Source: "otpflow/issuer", TraceParent: r.traceParent, Time: now}
}

// Purge deletes challenges whose last code expired more than the retention ago, with
// their codes, and rate-limit state that no window still needs.
func (s *Service) Purge(ctx context.Context) (int64, error) {
	return s.store.purge(ctx, s.cfg.Retention)
}

func (s *Service) skewBy() time.Duration {
	if s.skew == nil {
		return 0
	}
	return s.skew()
}

// challengeSubject tells the subjects of OTP_CHALLENGES, the verifier's stream.
func challengeSubject(subject string) bool {
	typ, _, err := events.SplitSubject(subject)
	return err == nil && slices.Contains(events.ChallengeTypes, typ)
}
