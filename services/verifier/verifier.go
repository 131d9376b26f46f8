// Package verifier answers otp.verify.<tenant>: it projects otp.issued into its own
// schema and checks presented codes against the stored HMACs, counting attempts exactly.
package verifier

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/window"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
)

// Schema is the PostgreSQL schema the verifier owns.
const Schema = "verifier"

//go:embed migrations/*.sql
var migrationFS embed.FS

// Migrations are the goose migrations of Schema.
func Migrations() fs.FS {
	sub, _ := fs.Sub(migrationFS, "migrations")
	return sub
}

// Service is one verifier process: a projection consumer and a micro service. Replicas
// share both (durable consumer, queue group).
type Service struct {
	cfg    Config
	pool   *pgxpool.Pool
	nc     *nats.Conn
	js     jetstream.JetStream
	log    *slog.Logger
	reg    prometheus.Registerer
	outbox *outbox.Outbox
	// now is the process clock. It only stamps the CloudEvents time of published
	// events; every expiry, window and stamp is decided on the database clock, so
	// replicas with drifting clocks agree with each other and with the issuer's rows.
	now    func() time.Time
	cons   jetstream.Consumer
	events jetstream.Stream
	// fenceSlots holds one token per verify waiting for the projection (MaxFenceWaits).
	fenceSlots chan struct{}
	// beforeProject runs before each projected batch (tests use it to slow the projection).
	beforeProject func()

	verifies     *prometheus.CounterVec
	projected    prometheus.Counter
	deadLettered prometheus.Counter
	fenceSkipped prometheus.Counter
}

// New returns a verifier; Run starts it. The schema must be migrated.
func New(cfg Config, pool *pgxpool.Pool, nc *nats.Conn, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Service, error) {
	if cfg.Pepper == nil {
		return nil, errors.New("verifier: pepper is required")
	}
	if cfg.Concurrency < 1 {
		cfg.Concurrency = 64
	}
	if cfg.BatchSize < 1 {
		cfg.BatchSize = 100
	}
	if cfg.Policies == nil {
		cfg.Policies = policy.Defaults()
	}
	if cfg.FenceWait == 0 {
		cfg.FenceWait = time.Second
	}
	if cfg.Retention == 0 {
		cfg.Retention = platform.Retention
	}
	if cfg.MaxFenceWaits < 1 {
		cfg.MaxFenceWaits = 16
	}
	if cfg.VerifyIPPerMinute == 0 {
		cfg.VerifyIPPerMinute = DefaultVerifyIPPerMinute
	}
	s := &Service{
		cfg: cfg, pool: pool, nc: nc, js: js, log: log, reg: reg, now: time.Now,
		fenceSlots: make(chan struct{}, cfg.MaxFenceWaits),
		outbox:     &outbox.Outbox{Table: Schema + ".outbox", Pool: pool, JS: js, Log: log},
		verifies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_verifier_verifications_total", Help: "Verify calls by reply status.",
		}, []string{"status"}),
		projected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_projected_events_total", Help: "otp.issued and otp.superseded events projected.",
		}),
		deadLettered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_dead_lettered_events_total", Help: "Projected events sent to OTP_DLQ instead (malformed, wrong tenant, refused by the database).",
		}),
		fenceSkipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_fence_skipped_total", Help: "Verifies of unknown requests answered without waiting for the projection, all MaxFenceWaits slots being busy.",
		}),
	}
	if reg != nil {
		reg.MustRegister(s.verifies, s.projected, s.deadLettered, s.fenceSkipped)
	}
	return s, nil
}

// Run serves verify requests and keeps the projection current until ctx is cancelled.
func (s *Service) Run(ctx context.Context) error {
	setupCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := platform.EnsureStreams(setupCtx, s.js, s.cfg.Streams); err != nil {
		return platform.SetupError(ctx, err)
	}
	cons, err := platform.EnsureConsumer(setupCtx, s.js, events.StreamEvents, events.VerifierConsumer)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	if s.events, err = s.js.Stream(setupCtx, events.StreamEvents); err != nil {
		return platform.SetupError(ctx, err)
	}
	s.cons = cons
	var inflight sync.WaitGroup
	sem := make(chan struct{}, s.cfg.Concurrency)
	svc, err := micro.AddService(s.nc, micro.Config{
		Name: "otp-verifier", Version: Version(), Description: "verifies one-time passcodes",
	})
	if err != nil {
		return fmt.Errorf("verify service: %w", err)
	}
	err = svc.AddEndpoint("verify", micro.HandlerFunc(func(req micro.Request) {
		sem <- struct{}{}
		inflight.Add(1)
		go func() {
			defer func() { <-sem; inflight.Done() }()
			s.serve(context.WithoutCancel(ctx), req)
		}()
	}), micro.WithEndpointSubject(events.TypeVerify.Wildcard()))
	if err != nil {
		return fmt.Errorf("verify endpoint: %w", err)
	}
	s.log.Info("verifier serving", "subject", events.TypeVerify.Wildcard())

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.outbox.Relay(gctx, 2*time.Second, 5*time.Second) })
	g.Go(func() error { return platform.PurgeEvery(gctx, 10*time.Minute, s.log, s.Purge) })
	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: events.ConsumerVerifier, BatchSize: s.cfg.BatchSize,
		JS: s.js, Log: s.log, Reg: s.reg})
	g.Go(func() error { return c.Run(gctx, s.project) })
	g.Go(func() error {
		<-gctx.Done()
		err := svc.Stop() // unsubscribes; requests in flight finish below
		inflight.Wait()
		return err
	})
	return g.Wait()
}

// serve answers one verify request. Every outcome, bad_request included, is a
// VerifyReply; only an internal failure (the caller should retry) is a micro error reply
// (headers Nats-Service-Error and Nats-Service-Error-Code: 500).
func (s *Service) serve(ctx context.Context, req micro.Request) {
	_, tenant, err := events.SplitSubject(req.Subject())
	var vr events.VerifyRequest
	if err == nil {
		vr, err = events.DecodeVerifyRequest(req.Data())
	}
	var reply events.VerifyReply
	if err != nil {
		reply = events.VerifyReply{Status: events.StatusBadRequest, Reason: err.Error()}
	} else if reply, err = s.Verify(ctx, tenant, vr); err != nil {
		s.log.Error("verify", "tenant", tenant, "request_id", vr.RequestID, "err", err)
		s.verifies.WithLabelValues("internal_error").Inc()
		_ = req.Error("500", "internal error; retry", nil)
		return
	}
	s.verifies.WithLabelValues(string(reply.Status)).Inc()
	if err := req.RespondJSON(reply); err != nil {
		s.log.Warn("verify reply", "err", err)
	}
}

// errNotProjected means the challenge is not in the projection (yet).
var errNotProjected = errors.New("challenge not projected")

// Verify checks code for (tenant, request_id) in one transaction that holds the
// challenge's row lock, so concurrent attempts are counted exactly. A call over the
// tenant's or the client IP's verify limit is answered rate_limited before the challenge
// is read, so it costs no attempt. A request the projection does not know yet waits
// until the projection has caught up with the stream (read-your-writes), at most
// FenceWait and at most MaxFenceWaits at once, then answers.
func (s *Service) Verify(ctx context.Context, tenant string, req events.VerifyRequest) (events.VerifyReply, error) {
	retryAfter, reason, err := s.checkLimits(ctx, tenant, req.Context.IP)
	if err != nil {
		return events.VerifyReply{}, fmt.Errorf("verify limits: %w", err)
	}
	if retryAfter > 0 {
		return events.VerifyReply{Status: events.StatusRateLimited, Reason: reason, RetryAfterSeconds: retryAfter}, nil
	}
	reply, err := s.verifyOnce(ctx, tenant, req, false)
	if !errors.Is(err, errNotProjected) {
		return reply, err
	}
	select {
	case s.fenceSlots <- struct{}{}:
		ferr := s.fence(ctx, tenant)
		<-s.fenceSlots
		if ferr != nil {
			s.log.Warn("read-your-writes fence", "tenant", tenant, "err", ferr)
		}
	default:
		s.fenceSkipped.Inc()
	}
	return s.verifyOnce(ctx, tenant, req, true)
}

func (s *Service) verifyOnce(ctx context.Context, tenant string, req events.VerifyRequest, final bool) (events.VerifyReply, error) {
	var reply events.VerifyReply
	var entries []outbox.Entry
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var ev []*nats.Msg
		var err error
		reply, ev, err = s.verifyTx(ctx, tx, tenant, req, final)
		if err != nil {
			return err
		}
		entries, err = s.outbox.Add(ctx, tx, ev...)
		return err
	})
	if err != nil {
		return events.VerifyReply{}, err
	}
	if err := s.outbox.Publish(ctx, entries); err != nil {
		s.log.Warn("publish verify events; the outbox relay will retry", "err", err)
	}
	return reply, nil
}

// fence waits until the projection has acknowledged the tenant's last otp.issued on the
// stream. Both reads go to leaders (the stream does not allow direct gets), so they are
// read-after-write coherent on a replicated stream too.
func (s *Service) fence(ctx context.Context, tenant string) error {
	if s.events == nil || s.cons == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.FenceWait)
	defer cancel()
	last, err := s.events.GetLastMsgForSubject(ctx, events.TypeIssued.Subject(tenant))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil // the tenant never had a challenge
	}
	if err != nil {
		return err
	}
	for {
		info, err := s.cons.Info(ctx)
		if err != nil {
			return err
		}
		if info.AckFloor.Stream >= last.Sequence {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

type storedCode struct {
	seq     int
	mac     []byte
	keyID   string
	expires time.Time
}

func (s *Service) verifyTx(ctx context.Context, tx pgx.Tx, tenant string, req events.VerifyRequest, final bool) (events.VerifyReply, []*nats.Msg, error) {
	var (
		challengeID, status, sessionID, recipientKey string
		attempts, maxAttempts                        int
		test                                         bool
	)
	err := tx.QueryRow(ctx, `SELECT challenge_id::text, attempts, max_attempts, status, session_id, recipient_key, test
		FROM verifier.challenges WHERE tenant = $1 AND request_id = $2 FOR UPDATE`, tenant, req.RequestID).
		Scan(&challengeID, &attempts, &maxAttempts, &status, &sessionID, &recipientKey, &test)
	switch {
	case errors.Is(err, pgx.ErrNoRows) && !final:
		return events.VerifyReply{}, nil, errNotProjected
	case err != nil && !errors.Is(err, pgx.ErrNoRows):
		return events.VerifyReply{}, nil, err
	}
	// The database clock decides expiry and the failure window, read once the row lock
	// is held: a verify that waited for the lock is judged at the time it runs.
	var now time.Time
	if err := tx.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&now); err != nil {
		return events.VerifyReply{}, nil, err
	}
	now = now.UTC()
	reason := ""
	failed := func(st events.VerifyStatus, remaining int) (events.VerifyReply, []*nats.Msg, error) {
		m, err := s.event(events.TypeVerifyFailed, tenant, fmt.Sprintf("verify_failed:%s:%s:%s", tenant, req.RequestID, newID()), challengeID,
			events.VerifyFailed{ChallengeID: challengeID, Tenant: tenant, RequestID: req.RequestID, Status: st,
				Attempts: attempts, AttemptsRemaining: remaining, FailedAt: now, Test: test, Reason: reason})
		return events.VerifyReply{Status: st, AttemptsRemaining: remaining, Reason: reason}, []*nats.Msg{m}, err
	}
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return failed(events.StatusNotFound, 0)
	case status == "verified":
		return failed(events.StatusAlreadyUsed, 0)
	case status == "locked":
		return failed(events.StatusLocked, 0)
	case status == "superseded":
		return failed(events.StatusSuperseded, 0)
	}

	p := s.cfg.Policies.For(tenant)
	// Failed verifications for this recipient across challenges (row-locked: exact).
	// Test recipients count like every address: their code is fixed, so a cap is all
	// that stands between a guesser cycling request ids and the code.
	var failures []time.Time
	if recipientKey != "" {
		if _, err := tx.Exec(ctx, `INSERT INTO verifier.recipient_failures (tenant, recipient_key) VALUES ($1, $2)
			ON CONFLICT DO NOTHING`, tenant, recipientKey); err != nil {
			return events.VerifyReply{}, nil, err
		}
		if err := tx.QueryRow(ctx, `SELECT stamps FROM verifier.recipient_failures WHERE tenant = $1 AND recipient_key = $2 FOR UPDATE`,
			tenant, recipientKey).Scan(&failures); err != nil {
			return events.VerifyReply{}, nil, err
		}
		failures = window.Stamps(failures).Trim(now.Add(-time.Hour))
	}
	if limit := p.RateLimits.RecipientFailuresPerHour; limit > 0 && len(failures) >= limit {
		reason = "recipient_failures"
		return failed(events.StatusLocked, 0)
	}

	rows, err := tx.Query(ctx, `SELECT code_seq, code_hmac, pepper_key_id, expires_at FROM verifier.codes
		WHERE challenge_id = $1 ORDER BY code_seq DESC LIMIT $2`, challengeID, p.RecentCodes)
	if err != nil {
		return events.VerifyReply{}, nil, err
	}
	codes, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (storedCode, error) {
		var c storedCode
		return c, r.Scan(&c.seq, &c.mac, &c.keyID, &c.expires)
	})
	if err != nil {
		return events.VerifyReply{}, nil, err
	}
	matched := 0
	live := 0
	for _, c := range codes {
		if !now.Before(c.expires) {
			continue
		}
		live++
		// Every live code is compared, match or not, so timing does not tell which matched.
		ok, err := s.cfg.Pepper.Equal(c.keyID, challengeID, req.Code, c.mac)
		if err != nil {
			return events.VerifyReply{}, nil, err
		}
		if ok && matched == 0 {
			matched = c.seq
		}
	}
	if live == 0 {
		return failed(events.StatusExpired, 0)
	}
	if sessionID != "" && req.Context.SessionID != sessionID {
		matched = 0 // a code bound to a session verifies only with it
	}
	attempts++
	if matched > 0 {
		if _, err := tx.Exec(ctx, `UPDATE verifier.challenges SET attempts = $2, status = 'verified', updated_at = now()
			WHERE challenge_id = $1`, challengeID, attempts); err != nil {
			return events.VerifyReply{}, nil, err
		}
		m, err := s.event(events.TypeVerified, tenant, "verified:"+challengeID, challengeID, events.Verified{
			ChallengeID: challengeID, Tenant: tenant, RequestID: req.RequestID, CodeSeq: matched,
			Attempts: attempts, VerifiedAt: now, Test: test})
		return events.VerifyReply{Status: events.StatusVerified}, []*nats.Msg{m}, err
	}
	newStatus := "active"
	if attempts >= maxAttempts {
		newStatus = "locked"
	}
	if _, err := tx.Exec(ctx, `UPDATE verifier.challenges SET attempts = $2, status = $3, updated_at = now()
		WHERE challenge_id = $1`, challengeID, attempts, newStatus); err != nil {
		return events.VerifyReply{}, nil, err
	}
	if recipientKey != "" {
		if _, err := tx.Exec(ctx, `UPDATE verifier.recipient_failures SET stamps = $3 WHERE tenant = $1 AND recipient_key = $2`,
			tenant, recipientKey, append(failures, now)); err != nil {
			return events.VerifyReply{}, nil, err
		}
	}
	reply, msgs, err := failed(events.StatusInvalidCode, max(maxAttempts-attempts, 0))
	if err != nil || newStatus != "locked" {
		return reply, msgs, err
	}
	m, err := s.event(events.TypeLocked, tenant, "locked:"+challengeID, challengeID, events.Locked{
		ChallengeID: challengeID, Tenant: tenant, RequestID: req.RequestID, Attempts: attempts, LockedAt: now, Test: test})
	return reply, append(msgs, m), err
}

// event builds an event; its body carries the decision's (database) time, its
// CloudEvents time the process clock, when the message was made.
func (s *Service) event(typ events.Type, tenant, id, challengeID string, v any) (*nats.Msg, error) {
	return events.NewMsg(typ, tenant, id, challengeID, v, events.Envelope{Source: "otpflow/verifier", Time: s.now()})
}
