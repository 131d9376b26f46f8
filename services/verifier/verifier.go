// Package verifier answers otp.verify.<tenant>: it projects its own stream,
// OTP_CHALLENGES (otp.challenge, otp.challenge_superseded), into its own schema and checks
// presented codes against the stored HMACs, counting attempts exactly. Beside it, it
// answers otp.status.<tenant>, what became of a request, from its projection of
// OTP_EVENTS (status.go).
package verifier

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
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
	store  *store
	nc     *nats.Conn
	js     jetstream.JetStream
	log    *slog.Logger
	reg    prometheus.Registerer
	outbox *outbox.Outbox
	// now is the process clock. It only stamps the CloudEvents time of published
	// events and tells the status projection when a batch may hold history worth the
	// database clock's look (statusHistoryCutoff); every expiry, window, stamp and cutoff
	// is decided on the database clock, so replicas with drifting clocks agree with each
	// other and with the issuer's rows.
	now  func() time.Time
	cons jetstream.Consumer
	// challenges is OTP_CHALLENGES, which the read-your-writes fence reads.
	challenges jetstream.Stream
	// floor follows the challenge projection's acknowledgement floor (fence.go); nil
	// until Run.
	floor *floorWatch
	// fenceSlots holds one token per verify waiting for the projection (MaxFenceWaits).
	fenceSlots chan struct{}
	// groups commits verifies together (group.go).
	groups *verifyGroups
	// beforeProject runs before each projected batch (tests use it to slow the projection).
	beforeProject func()
	// statusSlots holds one token per status call running (StatusConcurrency);
	// statusRates paces each tenant's status calls (StatusTenantPerMinute; nil: off).
	statusSlots chan struct{}
	statusRates *tenantRates

	verifies     *prometheus.CounterVec
	statuses     *prometheus.CounterVec
	statusEvents *prometheus.CounterVec
	projected    prometheus.Counter
	deadLettered prometheus.Counter
	fenceSkipped prometheus.Counter
	// index holds the supersessions on OTP_CHALLENGES the projection may not have
	// applied yet (fence.go).
	index           supersessionIndex
	supersededAhead prometheus.Counter
}

// New returns a verifier; Run starts it. The schema must be migrated.
func New(cfg Config, pool *pgxpool.Pool, nc *nats.Conn, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Service, error) {
	if cfg.Pepper == nil || cfg.Subjects == nil || cfg.DLQKey == nil {
		return nil, errors.New("verifier: pepper, subject key and DLQ key are required")
	}
	if cfg.Concurrency < 1 {
		cfg.Concurrency = 64
	}
	if cfg.StatusConcurrency < 1 {
		// A quarter of verify's, and never more than a quarter of the database pool,
		// whose connections verify needs too.
		cfg.StatusConcurrency = min(max(cfg.Concurrency/4, 4), max(int(pool.Config().MaxConns)/4, 1))
	}
	if cfg.StatusTenantPerMinute == 0 {
		cfg.StatusTenantPerMinute = DefaultStatusTenantPerMinute
	}
	cfg.Tracer = platform.Tracer(cfg.Tracer)
	if cfg.BatchSize < 1 {
		cfg.BatchSize = DefaultBatchSize
	}
	if cfg.StatusLinger == 0 {
		cfg.StatusLinger = DefaultStatusLinger
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
	if cfg.lockTimeout == 0 {
		cfg.lockTimeout = 2 * time.Second
	}
	if cfg.relayAge == 0 {
		cfg.relayAge = 5 * time.Second
	}
	if cfg.orphanDelay == 0 {
		cfg.orphanDelay = defaultOrphanDelay
	}
	if cfg.MaxFenceWaits < 1 {
		cfg.MaxFenceWaits = 16
	}
	if cfg.VerifyTransactions < 1 {
		cfg.VerifyTransactions = defaultVerifyTransactions
	}
	if cfg.VerifyGroupSize < 1 {
		cfg.VerifyGroupSize = defaultVerifyGroupSize
	}
	if cfg.VerifyIPPerMinute == 0 {
		cfg.VerifyIPPerMinute = DefaultVerifyIPPerMinute
	}
	s := &Service{
		cfg: cfg, nc: nc, js: js, log: log, reg: reg, now: time.Now,
		fenceSlots:  make(chan struct{}, cfg.MaxFenceWaits),
		statusSlots: make(chan struct{}, cfg.StatusConcurrency), statusRates: newTenantRates(cfg.StatusTenantPerMinute),
		verifies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_verifier_verifications_total", Help: "Verify calls by reply status.",
		}, []string{"status"}),
		statuses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_verifier_status_requests_total",
			Help: "Status calls by outcome: the state answered, not_found, bad_request, internal_error, busy (every status slot taken) or rate_limited (the tenant over StatusTenantPerMinute).",
		}, []string{"outcome"}),
		statusEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_verifier_status_events_total",
			Help: "OTP_EVENTS events the status projection settled, by outcome: projected (applied, whether or not they changed a request's state), retried (feedback about a challenge not projected yet), orphan_dropped (such feedback given up after its retries), before_retention (stored before the retention cutoff, acknowledged unread) or dead_letter (malformed, another request's challenge); those the database refused or that kept failing are in otpflow_deliveries_settled_total{consumer=\"verifier-status\"}.",
		}, []string{"outcome"}),
		projected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_projected_events_total", Help: "Challenge and supersession events projected.",
		}),
		deadLettered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_dead_lettered_events_total", Help: "Projected events the projection sent to OTP_DLQ (malformed, wrong tenant, another request's challenge); those the database refused or that kept failing are in otpflow_deliveries_settled_total{outcome=\"dead_letter\"}.",
		}),
		fenceSkipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_fence_skipped_total", Help: "Verifies of unknown requests answered without waiting for the projection, all MaxFenceWaits slots being busy.",
		}),
		supersededAhead: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_superseded_ahead_of_projection_total",
			Help: "Verifies answered superseded from a supersession on OTP_CHALLENGES that the projection had not applied yet.",
		}),
		index: supersessionIndex{tenants: map[string]*tenantSupersessions{}, most: maxAhead},
	}
	s.outbox = &outbox.Outbox{Table: Schema + ".outbox", Pool: pool, JS: js, Log: log}
	s.store = &store{pool: pool, outbox: s.outbox, groupRetries: prometheus.NewCounter(prometheus.CounterOpts{
		Name: "otpflow_verifier_verify_group_retries_total",
		Help: "Verify transactions run again after PostgreSQL aborted them as a deadlock or a serialization failure.",
	})}
	s.groups = newVerifyGroups(cfg.VerifyTransactions, cfg.VerifyGroupSize, s.runGroup, s.publishGroup)
	if reg != nil {
		reg.MustRegister(s.verifies, s.statuses, s.statusEvents, s.projected, s.deadLettered, s.fenceSkipped, s.supersededAhead, s.groups.size, s.groups.leftToRelay, s.store.groupRetries)
	}
	return s, nil
}

// Run serves verify and status requests and keeps both projections current until ctx is
// cancelled.
func (s *Service) Run(ctx context.Context) error {
	cons, err := platform.Bind(ctx, s.js, events.StreamChallenges, events.VerifierConsumer)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	// For one release: challenges issued before the upgrade are announced only on
	// OTP_EVENTS, by otp.issued with the code HMAC; the consumer of earlier releases
	// resumes where it stopped and projects them, so their codes keep verifying.
	legacy, err := platform.Bind(ctx, s.js, events.StreamEvents, events.VerifierLegacyConsumer)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	status, err := platform.Bind(ctx, s.js, events.StreamEvents, events.VerifierStatusConsumer)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	if s.challenges, err = s.js.Stream(ctx, events.StreamChallenges); err != nil {
		return platform.SetupError(ctx, err)
	}
	s.cons = cons
	s.floor = newFloorWatch(func(ctx context.Context) (uint64, error) {
		info, err := cons.Info(ctx)
		if err != nil {
			return 0, err
		}
		return info.AckFloor.Stream, nil
	})
	// The supersession index reads the stream past the floor: a first floor before any
	// verify, or the first would read every supersession there is.
	if _, err := s.floor.recent(ctx, 0); err != nil {
		return platform.SetupError(ctx, fmt.Errorf("the challenge projection's floor: %w", err))
	}
	var inflight sync.WaitGroup
	verifySlots := make(chan struct{}, s.cfg.Concurrency)
	svc, err := micro.AddService(s.nc, micro.Config{
		Name: "otp-verifier", Version: Version(), Description: "verifies one-time passcodes and tells what became of a request",
	})
	if err != nil {
		return fmt.Errorf("verify service: %w", err)
	}
	// Each request runs in a goroutine of its own, and all finish before the connection
	// drains. Verifies take one of the Concurrency slots, waiting for one in the
	// subscription's callback. Status calls have slots of their own (StatusConcurrency)
	// and never wait for one (admitStatus), so no number of status calls, however slow
	// their reads, holds a verify back.
	verifyHandler := micro.HandlerFunc(func(req micro.Request) {
		verifySlots <- struct{}{}
		inflight.Add(1)
		go func() {
			defer func() { <-verifySlots; inflight.Done() }()
			s.serve(context.WithoutCancel(ctx), req)
		}()
	})
	statusHandler := micro.HandlerFunc(func(req micro.Request) {
		if !s.admitStatus(req) {
			return
		}
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			s.serveStatus(context.WithoutCancel(ctx), req, func() { <-s.statusSlots })
		}()
	})
	if err := svc.AddEndpoint("verify", verifyHandler, micro.WithEndpointSubject(events.TypeVerify.Wildcard())); err != nil {
		return fmt.Errorf("verify endpoint: %w", err)
	}
	if err := svc.AddEndpoint("status", statusHandler, micro.WithEndpointSubject(events.TypeStatus.Wildcard())); err != nil {
		return fmt.Errorf("status endpoint: %w", err)
	}
	s.log.Info("verifier serving", "subjects", []string{events.TypeVerify.Wildcard(), events.TypeStatus.Wildcard()})

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.outbox.Relay(gctx, 2*time.Second, s.cfg.relayAge) })
	g.Go(func() error { return platform.PurgeEvery(gctx, 10*time.Minute, s.log, s.Purge) })
	g.Go(func() error { return s.floor.follow(gctx) })
	cc, lcc, scc := s.consumeConfigs()
	c := platform.NewConsumer(cons, cc)
	g.Go(func() error { return c.Run(gctx, s.project) })
	lc := platform.NewConsumer(legacy, lcc)
	g.Go(func() error { return lc.Run(gctx, s.project) })
	sc := platform.NewConsumer(status, scc)
	g.Go(func() error { return sc.Run(gctx, s.projectStatus) })
	g.Go(func() error {
		return platform.RunErasures(gctx, s.js, platform.ErasureConfig{Service: "verifier", Streams: s.cfg.Streams,
			Erase: s.Erase, DeadLetters: &platform.DeadLetters{Sealer: s.cfg.DLQKey}, Log: s.log, Reg: s.reg})
	})
	g.Go(func() error {
		<-gctx.Done()
		err := svc.Stop() // unsubscribes; requests in flight finish below
		inflight.Wait()
		s.groups.wait() // their events published before the connection closes
		return err
	})
	return g.Wait()
}

// serve answers one verify request. Every outcome, bad_request included, is a
// VerifyReply; only an internal failure (the caller should retry) is a micro error reply
// (headers Nats-Service-Error and Nats-Service-Error-Code: 500).
func (s *Service) serve(ctx context.Context, req micro.Request) {
	// The span continues the trace of the app's traceparent header, if it sent one.
	ctx, span := s.cfg.Tracer.Start(platform.ContextFrom(ctx, nats.Header(req.Headers())), "verify",
		trace.WithSpanKind(trace.SpanKindServer), trace.WithAttributes(attribute.String("rpc.system", "nats-micro"),
			attribute.String("messaging.destination.name", req.Subject())))
	defer span.End()
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
		span.SetStatus(codes.Error, "internal error")
		_ = req.Error("500", "internal error; retry", nil)
		return
	}
	s.verifies.WithLabelValues(string(reply.Status)).Inc()
	// No request id: the app chooses it, and it may spell a person.
	span.SetAttributes(attribute.String("otpflow.tenant", tenant), attribute.String("otpflow.verify.status", string(reply.Status)))
	if err := req.RespondJSON(reply); err != nil {
		s.log.Warn("verify reply", "err", err)
	}
}

// Purge deletes challenges whose newest code expired, or that were used, locked or
// superseded, more than the retention ago, with their codes; failure stamps older than
// an hour; verify-limit windows that no longer count; and request states (otp.status)
// not written for the retention. Every cutoff is on the database clock.
func (s *Service) Purge(ctx context.Context) (int64, error) {
	return s.store.purge(ctx, s.cfg.Retention)
}

// statusTimeout bounds a status call's read (a primary-key lookup): an app asks again
// rather than hold a slot, and a connection verify may need.
const statusTimeout = time.Second

// serveStatus answers one status request, holding a status slot that release gives back
// before the answer goes out (so an app that asks again at once finds it free). Every
// answer is a StatusReply: a malformed one gets Error "bad_request: …"; a database failure
// Error "internal", as a micro error reply (headers Nats-Service-Error and
// Nats-Service-Error-Code: 500), the caller should retry. The tenant is the subject's: an
// app can only be answered about its own requests.
func (s *Service) serveStatus(ctx context.Context, req micro.Request, release func()) {
	release = sync.OnceFunc(release)
	defer release()
	ctx, span := s.cfg.Tracer.Start(platform.ContextFrom(ctx, nats.Header(req.Headers())), "status",
		trace.WithSpanKind(trace.SpanKindServer), trace.WithAttributes(attribute.String("rpc.system", "nats-micro"),
			attribute.String("messaging.destination.name", req.Subject())))
	defer span.End()
	if s.cfg.beforeStatus != nil {
		s.cfg.beforeStatus()
	}
	_, tenant, err := events.SplitSubject(req.Subject())
	var sr events.StatusRequest
	if err == nil {
		sr, err = events.DecodeStatusRequest(req.Data())
	}
	if err != nil {
		s.statuses.WithLabelValues("bad_request").Inc()
		release()
		s.respondStatus(req, events.StatusReply{RequestID: sr.RequestID, Error: "bad_request: " + err.Error()})
		return
	}
	ctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	reply, err := s.Status(ctx, tenant, sr.RequestID)
	release()
	if err != nil {
		s.log.Error("status", "tenant", tenant, "request_id", sr.RequestID, "err", err)
		s.statuses.WithLabelValues("internal_error").Inc()
		span.SetStatus(codes.Error, "internal error")
		body, _ := json.Marshal(events.StatusReply{RequestID: sr.RequestID, Error: "internal"})
		if err := req.Error("500", "internal error; retry", body); err != nil {
			s.log.Warn("status reply", "err", err)
		}
		return
	}
	outcome := string(reply.State)
	if !reply.Found {
		outcome = "not_found"
	}
	s.statuses.WithLabelValues(outcome).Inc()
	span.SetAttributes(attribute.String("otpflow.tenant", tenant), attribute.String("otpflow.status.state", outcome))
	s.respondStatus(req, reply)
}

func (s *Service) respondStatus(req micro.Request, reply events.StatusReply) {
	if err := req.RespondJSON(reply); err != nil {
		s.log.Warn("status reply", "err", err)
	}
}

// consumeConfigs are the settings of the verifier's three consumers: the challenge
// projection (OTP_CHALLENGES), the projection of earlier releases' otp.issued
// (OTP_EVENTS) and the status projection. Healthy: a batch whose every event fails alone
// is blamed on the events only while the database answers; otherwise the consumer waits
// for it. Only the status projection lingers: a verify that comes before its code is
// projected waits for the challenge projection (verify.go, the fence).
func (s *Service) consumeConfigs() (challenges, legacy, status platform.ConsumeConfig) {
	dead := &platform.DeadLetters{Sealer: s.cfg.DLQKey, Recipient: platform.EventRecipient(s.cfg.Subjects)}
	base := platform.ConsumeConfig{BatchSize: s.cfg.BatchSize, JS: s.js, Log: s.log, Reg: s.reg, DeadLetters: dead,
		Healthy: s.store.pool.Ping}
	challenges, legacy, status = base, base, base
	challenges.Name = events.ConsumerVerifier
	legacy.Name = events.ConsumerVerifier + "-" + events.StreamEvents
	status.Name, status.Linger = events.VerifierStatusConsumer.Durable, s.cfg.StatusLinger
	return challenges, legacy, status
}
