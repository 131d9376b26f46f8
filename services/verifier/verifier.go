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
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/outbox"
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

// RecentCodes is how many of a challenge's newest codes verify (a resend keeps the
// earlier ones valid until their own expiry, so a slow first mail still works).
const RecentCodes = 3

// Config is the verifier's configuration.
type Config struct {
	Pepper *keys.Pepper
	// Concurrency bounds verify requests handled at once per process; default 64.
	Concurrency int
	BatchSize   int
	Streams     events.StreamOptions
}

// Service is one verifier process: a projection consumer and a micro service. Replicas
// share both (durable consumer, queue group).
type Service struct {
	cfg    Config
	pool   *pgxpool.Pool
	nc     *nats.Conn
	js     jetstream.JetStream
	log    *slog.Logger
	outbox *outbox.Outbox
	now    func() time.Time

	verifies  *prometheus.CounterVec
	projected prometheus.Counter
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
	s := &Service{
		cfg: cfg, pool: pool, nc: nc, js: js, log: log, now: time.Now,
		outbox: &outbox.Outbox{Table: Schema + ".outbox", Pool: pool, JS: js, Log: log},
		verifies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_verifier_verifications_total", Help: "Verify calls by reply status.",
		}, []string{"status"}),
		projected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_verifier_projected_events_total", Help: "otp.issued and otp.superseded events projected.",
		}),
	}
	if reg != nil {
		reg.MustRegister(s.verifies, s.projected)
	}
	return s, nil
}

// Run serves verify requests and keeps the projection current until ctx is cancelled.
func (s *Service) Run(ctx context.Context) error {
	setupCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := events.EnsureStreams(setupCtx, s.js, s.cfg.Streams); err != nil {
		return err
	}
	cons, err := events.EnsureConsumer(setupCtx, s.js, events.StreamEvents, events.VerifierConsumer)
	if err != nil {
		return err
	}
	var inflight sync.WaitGroup
	sem := make(chan struct{}, s.cfg.Concurrency)
	svc, err := micro.AddService(s.nc, micro.Config{
		Name: "otp-verifier", Version: "1.0.0", Description: "verifies one-time passcodes",
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
	g.Go(func() error { return platform.ConsumeBatches(gctx, cons, s.cfg.BatchSize, s.project) })
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

// Verify checks code for (tenant, request_id) in one transaction that holds the
// challenge's row lock, so concurrent attempts are counted exactly.
func (s *Service) Verify(ctx context.Context, tenant string, req events.VerifyRequest) (events.VerifyReply, error) {
	var reply events.VerifyReply
	var entries []outbox.Entry
	now := s.now()
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var ev []*nats.Msg
		var err error
		reply, ev, err = s.verifyTx(ctx, tx, tenant, req, now)
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

type storedCode struct {
	seq     int
	mac     []byte
	keyID   string
	expires time.Time
}

func (s *Service) verifyTx(ctx context.Context, tx pgx.Tx, tenant string, req events.VerifyRequest, now time.Time) (events.VerifyReply, []*nats.Msg, error) {
	var (
		challengeID, status, sessionID string
		attempts, maxAttempts          int
	)
	err := tx.QueryRow(ctx, `SELECT challenge_id::text, attempts, max_attempts, status, session_id
		FROM verifier.challenges WHERE tenant = $1 AND request_id = $2 FOR UPDATE`, tenant, req.RequestID).
		Scan(&challengeID, &attempts, &maxAttempts, &status, &sessionID)
	failed := func(st events.VerifyStatus, remaining int) (events.VerifyReply, []*nats.Msg, error) {
		m, err := s.event(events.TypeVerifyFailed, tenant, fmt.Sprintf("verify_failed:%s:%s:%s", tenant, req.RequestID, newID()), challengeID,
			events.VerifyFailed{ChallengeID: challengeID, Tenant: tenant, RequestID: req.RequestID, Status: st,
				Attempts: attempts, AttemptsRemaining: remaining, FailedAt: now.UTC()}, now)
		return events.VerifyReply{Status: st, AttemptsRemaining: remaining}, []*nats.Msg{m}, err
	}
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return failed(events.StatusNotFound, 0)
	case err != nil:
		return events.VerifyReply{}, nil, err
	case status == "verified":
		return failed(events.StatusAlreadyUsed, 0)
	case status == "locked":
		return failed(events.StatusLocked, 0)
	case status == "superseded":
		return failed(events.StatusSuperseded, 0)
	}

	rows, err := tx.Query(ctx, `SELECT code_seq, code_hmac, pepper_key_id, expires_at FROM verifier.codes
		WHERE challenge_id = $1 ORDER BY code_seq DESC LIMIT $2`, challengeID, RecentCodes)
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
			Attempts: attempts, VerifiedAt: now.UTC()}, now)
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
	reply, msgs, err := failed(events.StatusInvalidCode, max(maxAttempts-attempts, 0))
	if err != nil || newStatus != "locked" {
		return reply, msgs, err
	}
	m, err := s.event(events.TypeLocked, tenant, "locked:"+challengeID, challengeID, events.Locked{
		ChallengeID: challengeID, Tenant: tenant, RequestID: req.RequestID, Attempts: attempts, LockedAt: now.UTC()}, now)
	return reply, append(msgs, m), err
}

func (s *Service) event(typ events.Type, tenant, id, challengeID string, v any, now time.Time) (*nats.Msg, error) {
	return events.NewMsg(typ, tenant, id, challengeID, v, events.Envelope{Source: "otpflow/verifier", Time: now})
}

// project writes a batch of otp.issued and otp.superseded events in one transaction.
func (s *Service) project(ctx context.Context, batch []jetstream.Msg) {
	b := &pgx.Batch{}
	var bad []jetstream.Msg
	var good []jetstream.Msg
	for _, m := range batch {
		typ, tenant, err := events.SplitSubject(m.Subject())
		if err != nil {
			bad = append(bad, m)
			continue
		}
		switch typ {
		case events.TypeIssued:
			var e events.Issued
			if err := events.DecodeEvent(m.Data(), &e); err != nil || e.ChallengeID == "" || e.Tenant != tenant {
				bad = append(bad, m)
				continue
			}
			b.Queue(`INSERT INTO verifier.challenges (tenant, request_id, challenge_id, max_attempts, session_id)
				VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING`, tenant, e.RequestID, e.ChallengeID, e.MaxAttempts, e.SessionID)
			b.Queue(`INSERT INTO verifier.codes (challenge_id, code_seq, code_hmac, pepper_key_id, expires_at)
				VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING`, e.ChallengeID, e.CodeSeq, e.CodeHMAC, e.PepperKeyID, e.ExpiresAt)
		case events.TypeSuperseded:
			var e events.Superseded
			if err := events.DecodeEvent(m.Data(), &e); err != nil || e.ChallengeID == "" {
				bad = append(bad, m)
				continue
			}
			b.Queue(`UPDATE verifier.challenges SET status = 'superseded', updated_at = now()
				WHERE challenge_id = $1 AND status = 'active'`, e.ChallengeID)
		}
		good = append(good, m)
	}
	for _, m := range bad {
		_, tenant, _ := events.SplitSubject(m.Subject())
		if err := platform.DeadLetter(ctx, s.js, m, tenant, "verifier: undecodable event"); err != nil {
			s.log.Error("dead-letter", "err", err)
		}
	}
	if b.Len() > 0 {
		if err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return tx.SendBatch(ctx, b).Close() }); err != nil {
			s.log.Error("project events", "events", len(good), "err", err)
			for _, m := range good {
				md, _ := m.Metadata()
				n := uint64(1)
				if md != nil {
					n = md.NumDelivered
				}
				_ = m.NakWithDelay(platform.RetryDelay(n, 30*time.Second))
			}
			return
		}
	}
	s.projected.Add(float64(len(good)))
	for _, m := range good {
		_ = m.Ack()
	}
}
