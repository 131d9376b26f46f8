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
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/events/policy"
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

// Config is the verifier's configuration.
type Config struct {
	Pepper *keys.Pepper
	// Policies per tenant (OTP_TENANTS_FILE): recent codes that verify, the per-recipient
	// failure cap, the recipient_failures risk rule.
	Policies *policy.Set
	// FenceWait bounds how long a verify for an unknown request waits for the projection
	// to catch up with the stream (read-your-writes); default 1s.
	FenceWait time.Duration
	// Retention keeps expired, used and superseded challenges this long (OTP_RETENTION, default 24h).
	Retention time.Duration
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
	cons   jetstream.Consumer
	events jetstream.Stream
	// beforeProject runs before each projected batch (tests use it to slow the projection).
	beforeProject func()

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
	if cfg.Policies == nil {
		cfg.Policies = policy.Defaults()
	}
	if cfg.FenceWait == 0 {
		cfg.FenceWait = time.Second
	}
	if cfg.Retention == 0 {
		cfg.Retention = platform.Retention
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
		return platform.SetupError(ctx, err)
	}
	cons, err := events.EnsureConsumer(setupCtx, s.js, events.StreamEvents, events.VerifierConsumer)
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
	g.Go(func() error { return platform.PurgeEvery(gctx, 10*time.Minute, s.log, s.Purge) })
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

// errNotProjected means the challenge is not in the projection (yet).
var errNotProjected = errors.New("challenge not projected")

// Verify checks code for (tenant, request_id) in one transaction that holds the
// challenge's row lock, so concurrent attempts are counted exactly. A request the
// projection does not know yet waits until the projection has caught up with the stream
// (read-your-writes), then answers.
func (s *Service) Verify(ctx context.Context, tenant string, req events.VerifyRequest) (events.VerifyReply, error) {
	reply, err := s.verifyOnce(ctx, tenant, req, false)
	if errors.Is(err, errNotProjected) {
		if ferr := s.fence(ctx, tenant); ferr != nil {
			s.log.Warn("read-your-writes fence", "tenant", tenant, "err", ferr)
		}
		reply, err = s.verifyOnce(ctx, tenant, req, true)
	}
	return reply, err
}

func (s *Service) verifyOnce(ctx context.Context, tenant string, req events.VerifyRequest, final bool) (events.VerifyReply, error) {
	var reply events.VerifyReply
	var entries []outbox.Entry
	now := s.now()
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var ev []*nats.Msg
		var err error
		reply, ev, err = s.verifyTx(ctx, tx, tenant, req, now, final)
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

func (s *Service) verifyTx(ctx context.Context, tx pgx.Tx, tenant string, req events.VerifyRequest, now time.Time, final bool) (events.VerifyReply, []*nats.Msg, error) {
	var (
		challengeID, status, sessionID, recipientKey string
		attempts, maxAttempts                        int
		test                                         bool
	)
	err := tx.QueryRow(ctx, `SELECT challenge_id::text, attempts, max_attempts, status, session_id, recipient_key, test
		FROM verifier.challenges WHERE tenant = $1 AND request_id = $2 FOR UPDATE`, tenant, req.RequestID).
		Scan(&challengeID, &attempts, &maxAttempts, &status, &sessionID, &recipientKey, &test)
	reason := ""
	failed := func(st events.VerifyStatus, remaining int) (events.VerifyReply, []*nats.Msg, error) {
		m, err := s.event(events.TypeVerifyFailed, tenant, fmt.Sprintf("verify_failed:%s:%s:%s", tenant, req.RequestID, newID()), challengeID,
			events.VerifyFailed{ChallengeID: challengeID, Tenant: tenant, RequestID: req.RequestID, Status: st,
				Attempts: attempts, AttemptsRemaining: remaining, FailedAt: now.UTC(), Test: test, Reason: reason}, now)
		return events.VerifyReply{Status: st, AttemptsRemaining: remaining, Reason: reason}, []*nats.Msg{m}, err
	}
	switch {
	case errors.Is(err, pgx.ErrNoRows) && !final:
		return events.VerifyReply{}, nil, errNotProjected
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

	p := s.cfg.Policies.For(tenant)
	// Failed verifications for this recipient across challenges (row-locked: exact).
	var failures []time.Time
	if recipientKey != "" && !test {
		if _, err := tx.Exec(ctx, `INSERT INTO verifier.recipient_failures (tenant, recipient_key) VALUES ($1, $2)
			ON CONFLICT DO NOTHING`, tenant, recipientKey); err != nil {
			return events.VerifyReply{}, nil, err
		}
		if err := tx.QueryRow(ctx, `SELECT stamps FROM verifier.recipient_failures WHERE tenant = $1 AND recipient_key = $2 FOR UPDATE`,
			tenant, recipientKey).Scan(&failures); err != nil {
			return events.VerifyReply{}, nil, err
		}
		failures = since(failures, now.Add(-time.Hour))
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
			Attempts: attempts, VerifiedAt: now.UTC(), Test: test}, now)
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
	if recipientKey != "" && !test {
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
		ChallengeID: challengeID, Tenant: tenant, RequestID: req.RequestID, Attempts: attempts, LockedAt: now.UTC(), Test: test}, now)
	return reply, append(msgs, m), err
}

func (s *Service) event(typ events.Type, tenant, id, challengeID string, v any, now time.Time) (*nats.Msg, error) {
	return events.NewMsg(typ, tenant, id, challengeID, v, events.Envelope{Source: "otpflow/verifier", Time: now})
}

// project writes a batch of otp.issued and otp.superseded events in one transaction.
func (s *Service) project(ctx context.Context, batch []jetstream.Msg) {
	if s.beforeProject != nil {
		s.beforeProject()
	}
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
			b.Queue(`INSERT INTO verifier.challenges (tenant, request_id, challenge_id, max_attempts, session_id, recipient_key, test, risk)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING`, tenant, e.RequestID, e.ChallengeID, e.MaxAttempts,
				e.SessionID, strings.ToLower(e.Recipient), e.Test, append([]string{}, e.Risk...))
			b.Queue(`INSERT INTO verifier.codes (challenge_id, code_seq, code_hmac, pepper_key_id, expires_at, issued_at)
				VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING`, e.ChallengeID, e.CodeSeq, e.CodeHMAC, e.PepperKeyID, e.ExpiresAt, e.IssuedAt)
			// Risk rule recipient_failures: a new challenge for a recipient with recent failed
			// verifications (on earlier challenges) gets fewer attempts.
			if rf := s.cfg.Policies.For(tenant).Risk.RecipientFailures; rf.Failures > 0 && e.CodeSeq == 1 && !e.Test {
				b.Queue(`UPDATE verifier.challenges c SET max_attempts = LEAST(c.max_attempts, $3),
						risk = array_append(c.risk, 'recipient_failures')
					FROM verifier.recipient_failures f
					WHERE c.challenge_id = $1 AND c.attempts = 0 AND NOT ('recipient_failures' = ANY (c.risk))
						AND f.tenant = c.tenant AND f.recipient_key = c.recipient_key
						AND (SELECT count(*) FROM unnest(f.stamps) AS s(t) WHERE s.t > $2) >= $4`,
					e.ChallengeID, s.now().Add(-rf.Window), rf.MaxAttempts, rf.Failures)
			}
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

// since keeps the stamps after t, in order.
func since(stamps []time.Time, t time.Time) []time.Time {
	i := 0
	for i < len(stamps) && !stamps[i].After(t) {
		i++
	}
	return stamps[i:]
}

// Purge deletes challenges whose newest code expired, or that were used, locked or
// superseded, more than the retention ago, with their codes; and failure stamps older
// than an hour.
func (s *Service) Purge(ctx context.Context) (int64, error) {
	cutoff := s.now().Add(-s.cfg.Retention)
	var total int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT c.challenge_id FROM verifier.challenges c
			WHERE (c.status <> 'active' AND c.updated_at < $1)
			   OR NOT EXISTS (SELECT 1 FROM verifier.codes k WHERE k.challenge_id = c.challenge_id AND k.expires_at >= $1)
			FOR UPDATE SKIP LOCKED`, cutoff)
		if err != nil {
			return err
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil || len(ids) == 0 {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM verifier.codes WHERE challenge_id = ANY($1::uuid[])`, ids); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `DELETE FROM verifier.challenges WHERE challenge_id = ANY($1::uuid[])`, ids)
		total = tag.RowsAffected()
		return err
	})
	if err != nil {
		return total, err
	}
	tag, err := s.pool.Exec(ctx, `DELETE FROM verifier.recipient_failures WHERE coalesce(stamps[array_upper(stamps, 1)], '-infinity') < $1`,
		s.now().Add(-time.Hour))
	return total + tag.RowsAffected(), err
}
