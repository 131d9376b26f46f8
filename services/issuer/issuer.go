// Package issuer turns otp.requested events into challenges: it validates the request,
// draws a code, stores only its HMAC, and publishes the sealed code to the dispatchers
// (otp.dispatch) and the challenge without the code to everyone else (otp.issued).
package issuer

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/prometheus/client_golang/prometheus"
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

// Config is the issuer's policy and keys. Zero values take the defaults.
type Config struct {
	Pepper *keys.Pepper
	Sealer *keys.Sealer

	CodeLength     int           // digits per code; default 6
	DefaultTTL     time.Duration // code lifetime when the request sets none; default 5m
	MaxAttempts    int           // verify attempts per challenge; default 5
	ResendCooldown time.Duration // minimum time between two codes of a challenge; default 30s
	MaxSends       int           // codes per challenge; default 5
	BatchSize      int           // requests per transaction; default 100
	Streams        events.StreamOptions
}

func (c *Config) setDefaults() {
	if c.CodeLength == 0 {
		c.CodeLength = 6
	}
	if c.DefaultTTL == 0 {
		c.DefaultTTL = 5 * time.Minute
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = 5
	}
	if c.ResendCooldown == 0 {
		c.ResendCooldown = 30 * time.Second
	}
	if c.MaxSends == 0 {
		c.MaxSends = 5
	}
	if c.BatchSize == 0 {
		c.BatchSize = 100
	}
}

// Service is one issuer process. Any number may run; they share the durable consumer.
type Service struct {
	cfg    Config
	pool   *pgxpool.Pool
	js     jetstream.JetStream
	log    *slog.Logger
	outbox *outbox.Outbox
	now    func() time.Time

	requests *prometheus.CounterVec
	batch    prometheus.Histogram
}

// New returns an issuer; Run starts it. The schema must be migrated.
func New(cfg Config, pool *pgxpool.Pool, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Service, error) {
	if cfg.Pepper == nil || cfg.Sealer == nil {
		return nil, errors.New("issuer: pepper and seal key are required")
	}
	cfg.setDefaults()
	s := &Service{
		cfg: cfg, pool: pool, js: js, log: log, now: time.Now,
		outbox: &outbox.Outbox{Table: Schema + ".outbox", Pool: pool, JS: js, Log: log},
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_issuer_requests_total", Help: "otp.requested messages handled, by outcome.",
		}, []string{"outcome"}),
		batch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "otpflow_issuer_batch_size", Help: "Requests handled per transaction.",
			Buckets: []float64{1, 2, 5, 10, 20, 50, 100, 200},
		}),
	}
	if reg != nil {
		reg.MustRegister(s.requests, s.batch)
	}
	return s, nil
}

// Run consumes otp.requested until ctx is cancelled, then finishes the batch in hand.
func (s *Service) Run(ctx context.Context) error {
	setupCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := events.EnsureStreams(setupCtx, s.js, s.cfg.Streams); err != nil {
		return err
	}
	cons, err := events.EnsureConsumer(setupCtx, s.js, events.StreamRequests, events.IssuerConsumer)
	if err != nil {
		return err
	}
	s.log.Info("issuer consuming", "stream", events.StreamRequests, "consumer", events.ConsumerIssuer)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.outbox.Relay(gctx, 2*time.Second, 5*time.Second) })
	g.Go(func() error { return platform.ConsumeBatches(gctx, cons, s.cfg.BatchSize, s.handleBatch) })
	return g.Wait()
}

// request is one pulled otp.requested message on its way through a batch.
type request struct {
	msg    jetstream.Msg
	seq    uint64
	tenant string
	req    events.Requested
	// Set by the decision: reject (publish otp.rejected, terminate) or accept.
	reject  *events.Rejected
	outcome string
}

func (s *Service) handleBatch(ctx context.Context, batch []jetstream.Msg) {
	s.batch.Observe(float64(len(batch)))
	now := s.now()
	reqs := make([]*request, 0, len(batch))
	var valid []*request
	for _, m := range batch {
		r := &request{msg: m}
		if md, err := m.Metadata(); err == nil {
			r.seq = md.Sequence.Stream
		}
		reqs = append(reqs, r)
		_, tenant, err := events.SplitSubject(m.Subject())
		if err == nil {
			r.tenant = tenant
			r.req, err = events.DecodeRequested(m.Data())
		}
		if err != nil {
			r.reject = rejection(r, err, now)
			continue
		}
		valid = append(valid, r)
	}

	entries, err := s.issue(ctx, valid, now)
	if err != nil {
		s.log.Error("issue batch", "requests", len(valid), "err", err)
		for _, r := range valid {
			r.outcome, r.reject = "", nil
			s.retry(ctx, r.msg, err)
		}
	} else if err := s.outbox.Publish(ctx, entries); err != nil {
		// Committed: the relay publishes the rows later under the same ids.
		s.log.Warn("publish after commit; the outbox relay will retry", "err", err)
	}

	var rejected []*nats.Msg
	for _, r := range reqs {
		if r.reject == nil {
			continue
		}
		m, err := events.NewMsg(events.TypeRejected, rejectTenant(r), fmt.Sprintf("rejected:%d", r.seq), "", r.reject, s.envelope(r.msg, now))
		if err == nil {
			rejected = append(rejected, m)
		}
	}
	pubErr := platform.PublishAll(ctx, s.js, rejected)
	for _, r := range reqs {
		switch {
		case r.reject != nil && pubErr != nil:
			s.retry(ctx, r.msg, pubErr)
		case r.reject != nil:
			s.requests.WithLabelValues("rejected").Inc()
			s.log.Info("request rejected", "tenant", r.reject.Tenant, "request_id", r.reject.RequestID,
				"reason", r.reject.Reason, "field", r.reject.Field, "seq", r.seq)
			_ = r.msg.TermWithReason(string(r.reject.Reason))
		case r.outcome != "":
			s.requests.WithLabelValues(r.outcome).Inc()
			_ = r.msg.Ack()
		}
	}
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

// retry redelivers m later, or dead-letters it once it used up its deliveries.
func (s *Service) retry(ctx context.Context, m jetstream.Msg, cause error) {
	md, err := m.Metadata()
	if err == nil && md.NumDelivered >= uint64(events.IssuerConsumer.MaxDeliver) {
		_, tenant, _ := events.SplitSubject(m.Subject())
		if err := platform.DeadLetter(ctx, s.js, m, tenant, cause.Error()); err != nil {
			s.log.Error("dead-letter request", "err", err)
		}
		s.requests.WithLabelValues("dead_lettered").Inc()
		return
	}
	n := uint64(1)
	if err == nil {
		n = md.NumDelivered
	}
	_ = m.NakWithDelay(platform.RetryDelay(n, 30*time.Second))
}

func (s *Service) envelope(m jetstream.Msg, now time.Time) events.Envelope {
	return events.Envelope{Source: "otpflow/issuer", TraceParent: m.Headers().Get(events.HeaderTraceParent), Time: now}
}

// challenge is the locked state of one (tenant, request_id) inside a batch transaction.
type challenge struct {
	id         string
	codeCount  int
	lastCodeAt time.Time
	isNew      bool
}

type key struct{ tenant, requestID string }

// issue decides every valid request of the batch in one transaction: a new challenge, a
// duplicate, a resend or a refusal. It returns the committed outbox entries.
func (s *Service) issue(ctx context.Context, reqs []*request, now time.Time) ([]outbox.Entry, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	var entries []outbox.Entry
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		entries = nil
		state, err := lockChallenges(ctx, tx, reqs)
		if err != nil {
			return err
		}
		writes := &pgx.Batch{}
		var msgs []*nats.Msg
		for _, r := range reqs {
			r.reject, r.outcome = nil, ""
			k := key{r.tenant, r.req.RequestID}
			c := state[k]
			switch {
			case c == nil:
				c = &challenge{id: newID(), isNew: true}
				state[k] = c
				r.outcome = "issued"
			case !r.req.Resend:
				r.outcome = "duplicate"
				continue
			case c.codeCount >= s.cfg.MaxSends:
				r.reject = s.refuse(r, now, events.ReasonRateLimited, "this challenge reached its send cap; start a new request", 0)
				continue
			case now.Sub(c.lastCodeAt) < s.cfg.ResendCooldown:
				wait := s.cfg.ResendCooldown - now.Sub(c.lastCodeAt)
				r.reject = s.refuse(r, now, events.ReasonRateLimited, "resend cooldown", int((wait+time.Second-1)/time.Second))
				continue
			default:
				r.outcome = "resent"
			}
			c.codeCount++
			c.lastCodeAt = now
			out, err := s.newCode(writes, r, c, now)
			if err != nil {
				return err
			}
			msgs = append(msgs, out...)
		}
		if err := tx.SendBatch(ctx, writes).Close(); err != nil {
			return fmt.Errorf("write challenges: %w", err)
		}
		entries, err = s.outbox.Add(ctx, tx, msgs...)
		return err
	})
	if err != nil {
		return nil, err
	}
	return entries, nil
}

func (s *Service) refuse(r *request, now time.Time, reason events.RejectReason, detail string, retryAfter int) *events.Rejected {
	return &events.Rejected{Tenant: r.tenant, RequestID: r.req.RequestID, Reason: reason, Detail: detail,
		RetryAfterSeconds: retryAfter, RequestSeq: r.seq, RejectedAt: now.UTC()}
}

// lockChallenges reads and row-locks the existing challenges of the batch, in key order
// so that two issuers never deadlock.
func lockChallenges(ctx context.Context, tx pgx.Tx, reqs []*request) (map[key]*challenge, error) {
	var ks []key
	seen := map[key]bool{}
	for _, r := range reqs {
		k := key{r.tenant, r.req.RequestID}
		if !seen[k] {
			seen[k] = true
			ks = append(ks, k)
		}
	}
	slices.SortFunc(ks, func(a, b key) int {
		if c := strings.Compare(a.tenant, b.tenant); c != 0 {
			return c
		}
		return strings.Compare(a.requestID, b.requestID)
	})
	b := &pgx.Batch{}
	for _, k := range ks {
		b.Queue(`SELECT challenge_id::text, code_count, last_code_at FROM issuer.challenges
			WHERE tenant = $1 AND request_id = $2 FOR UPDATE`, k.tenant, k.requestID)
	}
	res := tx.SendBatch(ctx, b)
	defer res.Close()
	state := make(map[key]*challenge, len(ks))
	for _, k := range ks {
		var c challenge
		err := res.QueryRow().Scan(&c.id, &c.codeCount, &c.lastCodeAt)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
		case err != nil:
			return nil, fmt.Errorf("lock challenges: %w", err)
		default:
			state[k] = &c
		}
	}
	return state, res.Close()
}

// newCode draws code number c.codeCount of challenge c, queues its rows, and returns the
// dispatch job (sealed code) and the issued event (HMAC only).
func (s *Service) newCode(writes *pgx.Batch, r *request, c *challenge, now time.Time) ([]*nats.Msg, error) {
	ttl := s.cfg.DefaultTTL
	if r.req.TTLSeconds > 0 {
		ttl = time.Duration(r.req.TTLSeconds) * time.Second
	}
	expires := now.Add(ttl)
	code, err := newCode(s.cfg.CodeLength)
	if err != nil {
		return nil, fmt.Errorf("draw code: %w", err)
	}
	pepperID := s.cfg.Pepper.ActiveID()
	mac, err := s.cfg.Pepper.MAC(pepperID, c.id, code)
	if err != nil {
		return nil, err
	}
	sealID, sealed, err := s.cfg.Sealer.Seal(c.id, code)
	if err != nil {
		return nil, fmt.Errorf("seal code: %w", err)
	}
	if c.isNew && c.codeCount == 1 {
		writes.Queue(`INSERT INTO issuer.challenges (tenant, request_id, challenge_id, recipient, purpose, locale,
			session_id, code_count, last_code_at, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)`,
			r.tenant, r.req.RequestID, c.id, r.req.Recipient, r.req.Purpose, r.req.Locale,
			r.req.Context.SessionID, c.codeCount, now, expires)
	} else {
		writes.Queue(`UPDATE issuer.challenges SET code_count = $2, last_code_at = $3, expires_at = $4
			WHERE challenge_id = $1`, c.id, c.codeCount, now, expires)
	}
	writes.Queue(`INSERT INTO issuer.codes (challenge_id, code_seq, code_hmac, pepper_key_id, issued_at, expires_at)
		VALUES ($1,$2,$3,$4,$5,$6)`, c.id, c.codeCount, mac, pepperID, now, expires)

	env := s.envelope(r.msg, now)
	job := events.DispatchJob{
		ChallengeID: c.id, Tenant: r.tenant, RequestID: r.req.RequestID, CodeSeq: c.codeCount,
		Recipient: r.req.Recipient, Purpose: r.req.Purpose, Locale: r.req.Locale,
		IssuedAt: now.UTC(), ExpiresAt: expires.UTC(), SealKeyID: sealID, SealedCode: sealed,
	}
	issued := events.Issued{
		ChallengeID: c.id, Tenant: r.tenant, RequestID: r.req.RequestID, CodeSeq: c.codeCount,
		Recipient: r.req.Recipient, Purpose: r.req.Purpose, Locale: r.req.Locale,
		CodeLength: s.cfg.CodeLength, CodeHMAC: mac, PepperKeyID: pepperID, MaxAttempts: s.cfg.MaxAttempts,
		SessionID: r.req.Context.SessionID, ClientIP: r.req.Context.IP, Resend: c.codeCount > 1,
		IssuedAt: now.UTC(), ExpiresAt: expires.UTC(),
	}
	jm, err := events.NewMsg(events.TypeDispatch, r.tenant, fmt.Sprintf("dispatch:%s:%d", c.id, c.codeCount), c.id, job, env)
	if err != nil {
		return nil, err
	}
	im, err := events.NewMsg(events.TypeIssued, r.tenant, fmt.Sprintf("issued:%s:%d", c.id, c.codeCount), c.id, issued, env)
	if err != nil {
		return nil, err
	}
	// The issued event goes first: the verifier should know the challenge before the
	// user can read the mail.
	return []*nats.Msg{im, jm}, nil
}
