// Package dispatcher mails the codes: it takes dispatch jobs from the OTP_DISPATCH work
// queue, unseals the code, renders the mail and sends it through the provider chain,
// and reports otp.delivered, otp.delivery_failed or otp.dispatch_expired.
package dispatcher

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
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/prometheus/client_golang/prometheus"
)

// Schema is the PostgreSQL schema the dispatcher owns.
const Schema = "dispatcher"

//go:embed migrations/*.sql
var migrationFS embed.FS

// Migrations are the goose migrations of Schema.
func Migrations() fs.FS {
	sub, _ := fs.Sub(migrationFS, "migrations")
	return sub
}

// Config is the dispatcher's configuration.
type Config struct {
	Sealer    *keys.Sealer
	Providers []mailer.Provider
	From      string
	// Concurrency is the number of sends in flight per process (OTP_DISPATCH_CONCURRENCY).
	Concurrency int
	Streams     events.StreamOptions
}

// Service is one dispatcher process. Any number share the durable consumer.
type Service struct {
	cfg   Config
	pool  *pgxpool.Pool
	js    jetstream.JetStream
	log   *slog.Logger
	chain *mailer.Chain
	tmpl  *Templates
	now   func() time.Time

	sends   *prometheus.CounterVec
	latency *prometheus.HistogramVec
	jobs    *prometheus.CounterVec
}

// New returns a dispatcher; Run starts it. The schema must be migrated.
func New(cfg Config, pool *pgxpool.Pool, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Service, error) {
	if cfg.Sealer == nil || len(cfg.Providers) == 0 || cfg.From == "" {
		return nil, errors.New("dispatcher: seal key, providers and sender are required")
	}
	if cfg.Concurrency < 1 {
		cfg.Concurrency = 16
	}
	tmpl, err := LoadTemplates()
	if err != nil {
		return nil, err
	}
	s := &Service{
		cfg: cfg, pool: pool, js: js, log: log, chain: &mailer.Chain{Providers: cfg.Providers}, tmpl: tmpl, now: time.Now,
		sends: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_sends_total", Help: "Send attempts by provider and outcome (ok or failure class).",
		}, []string{"provider", "outcome"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "otpflow_dispatcher_send_seconds", Help: "Provider send latency.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}, []string{"provider"}),
		jobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_jobs_total", Help: "Dispatch jobs settled, by outcome.",
		}, []string{"outcome"}),
	}
	if reg != nil {
		reg.MustRegister(s.sends, s.latency, s.jobs)
	}
	return s, nil
}

// Run consumes dispatch jobs until ctx is cancelled, then finishes the sends in hand.
func (s *Service) Run(ctx context.Context) error {
	setupCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := events.EnsureStreams(setupCtx, s.js, s.cfg.Streams); err != nil {
		return err
	}
	cons, err := events.EnsureConsumer(setupCtx, s.js, events.StreamDispatch, events.DispatcherConsumer)
	if err != nil {
		return err
	}
	s.log.Info("dispatcher consuming", "stream", events.StreamDispatch, "consumer", events.ConsumerDispatcher,
		"concurrency", s.cfg.Concurrency)
	return platform.ConsumeBatches(ctx, cons, s.cfg.Concurrency, s.handleBatch)
}

// job is one pulled dispatch job on its way through a batch.
type job struct {
	msg jetstream.Msg
	md  *jetstream.MsgMetadata
	job events.DispatchJob

	// The delivery row as claimed.
	status      string
	attempts    int
	provider    string
	providerMsg string

	// What this batch decided; settle acts on it.
	result    string // sent, failed, expired, retry
	reason    string
	exhausted bool // transient failures used up MaxDeliver
	outMsgs   []*nats.Msg
}

// Delivery row states.
const (
	stateSending = "sending"
	stateSent    = "sent"
	stateFailed  = "failed"
	stateExpired = "expired"
	resultRetry  = "retry"
)

func (s *Service) handleBatch(ctx context.Context, batch []jetstream.Msg) {
	var jobs []*job
	for _, m := range batch {
		md, err := m.Metadata()
		if err != nil {
			_ = m.NakWithDelay(time.Second)
			continue
		}
		_, tenant, err := events.SplitSubject(m.Subject())
		var dj events.DispatchJob
		if err == nil {
			dj, err = events.DecodeDispatchJob(m.Data())
		}
		if err == nil && dj.Tenant != tenant {
			err = fmt.Errorf("job tenant %q does not match its subject", dj.Tenant)
		}
		if err != nil {
			s.log.Error("undecodable dispatch job", "seq", md.Sequence.Stream, "err", err)
			s.jobs.WithLabelValues("dead_lettered").Inc()
			if err := platform.DeadLetter(ctx, s.js, m, tenant, "undecodable dispatch job: "+err.Error()); err != nil {
				s.log.Error("dead-letter", "err", err)
			}
			continue
		}
		jobs = append(jobs, &job{msg: m, md: md, job: dj})
	}
	if len(jobs) == 0 {
		return
	}
	if err := s.claim(ctx, jobs); err != nil {
		s.log.Error("claim deliveries", "jobs", len(jobs), "err", err)
		for _, j := range jobs {
			_ = j.msg.NakWithDelay(platform.RetryDelay(j.md.NumDelivered, 30*time.Second))
		}
		return
	}

	now := s.now()
	var wg sync.WaitGroup
	for _, j := range jobs {
		switch {
		case j.status != stateSending:
			j.result = j.status // settled earlier: report again, send nothing
		case !now.Before(j.job.ExpiresAt):
			j.result = stateExpired
		default:
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.send(ctx, j)
			}()
		}
	}
	wg.Wait()

	if err := s.record(ctx, jobs); err != nil {
		// The mails that went out may go out again on redelivery: the one window in
		// which a crash or a database failure can send a code twice.
		s.log.Error("record deliveries", "jobs", len(jobs), "err", err)
		for _, j := range jobs {
			_ = j.msg.NakWithDelay(platform.RetryDelay(j.md.NumDelivered, 30*time.Second))
		}
		return
	}
	s.settle(ctx, jobs)
}

// claim upserts a 'sending' row per job (counting the attempt) and reads back each row's
// state, all in one transaction.
func (s *Service) claim(ctx context.Context, jobs []*job) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		b := &pgx.Batch{}
		for _, j := range jobs {
			b.Queue(`INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id, status, attempts, expires_at, claimed_at)
				VALUES ($1, $2, $3, $4, 'sending', 1, $5, now())
				ON CONFLICT (challenge_id, code_seq) DO UPDATE SET
					attempts = dispatcher.deliveries.attempts + CASE WHEN dispatcher.deliveries.status = 'sending' THEN 1 ELSE 0 END,
					claimed_at = now()
				RETURNING status, attempts, provider, provider_message_id`,
				j.job.ChallengeID, j.job.CodeSeq, j.job.Tenant, j.job.RequestID, j.job.ExpiresAt)
		}
		res := tx.SendBatch(ctx, b)
		defer res.Close()
		for _, j := range jobs {
			if err := res.QueryRow().Scan(&j.status, &j.attempts, &j.provider, &j.providerMsg); err != nil {
				return err
			}
		}
		return res.Close()
	})
}

// send mails one job's code through the chain, telling JetStream the job is in progress
// so a slow provider never causes a redelivery.
func (s *Service) send(ctx context.Context, j *job) {
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		t := time.NewTicker(events.DispatcherConsumer.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				_ = j.msg.InProgress()
			}
		}
	}()

	code, err := s.cfg.Sealer.Open(j.job.SealKeyID, j.job.ChallengeID, j.job.SealedCode)
	if err != nil {
		j.result, j.reason = stateFailed, "cannot unseal the code: "+err.Error()
		return
	}
	minutes := int(j.job.ExpiresAt.Sub(j.job.IssuedAt).Round(time.Minute) / time.Minute)
	subject, text, html, err := s.tmpl.Render(j.job.Locale, TemplateData{Code: code, Minutes: max(minutes, 1), Purpose: j.job.Purpose, Tenant: j.job.Tenant})
	if err != nil {
		j.result, j.reason = stateFailed, "render: "+err.Error()
		return
	}
	id := fmt.Sprintf("%s:%d", j.job.ChallengeID, j.job.CodeSeq)
	m := &mailer.Message{
		From: s.cfg.From, To: j.job.Recipient, Subject: subject, Text: text, HTML: html, ID: id,
		Headers: map[string]string{"X-Otp-Challenge-Id": j.job.ChallengeID, "X-Otp-Tenant": j.job.Tenant},
		Tags:    map[string]string{"tenant": j.job.Tenant, "purpose": j.job.Purpose, "challenge_id": j.job.ChallengeID},
	}
	start := time.Now()
	res, err := s.chain.Send(ctx, m)
	for _, a := range res.Attempts {
		outcome := "ok"
		if a.Err != nil {
			outcome = string(mailer.ClassOf(a.Err))
		}
		s.sends.WithLabelValues(a.Provider, outcome).Inc()
	}
	if err == nil {
		s.latency.WithLabelValues(res.Provider).Observe(time.Since(start).Seconds())
		j.result, j.provider, j.providerMsg = stateSent, res.Provider, res.Receipt.MessageID
		return
	}
	j.reason = err.Error()
	if mailer.ClassOf(err) == mailer.Permanent {
		j.result = stateFailed
		var se *mailer.SendError
		if errors.As(err, &se) {
			j.provider = se.Provider
		}
		return
	}
	j.result = resultRetry
	s.log.Warn("send failed; will retry", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq,
		"delivery", j.md.NumDelivered, "err", err)
}

// record writes every job's result in one transaction and builds the events to publish.
func (s *Service) record(ctx context.Context, jobs []*job) error {
	now := s.now().UTC()
	b := &pgx.Batch{}
	for _, j := range jobs {
		if j.result == resultRetry && j.md.NumDelivered >= uint64(events.DispatcherConsumer.MaxDeliver) {
			j.result, j.exhausted = stateFailed, true
			j.reason = "deliveries exhausted: " + j.reason
		}
		dj := j.job
		switch j.result {
		case stateSent:
			j.outMsgs = s.event(events.TypeDelivered, "delivered", j, events.Delivered{
				ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID, CodeSeq: dj.CodeSeq,
				Provider: j.provider, ProviderMessageID: j.providerMsg, Attempts: j.attempts, DeliveredAt: now})
		case stateFailed:
			j.outMsgs = s.event(events.TypeDeliveryFailed, "delivery_failed", j, events.DeliveryFailed{
				ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID, CodeSeq: dj.CodeSeq,
				Provider: j.provider, Reason: truncate(j.reason, 500), Permanent: !j.exhausted,
				Attempts: j.attempts, FailedAt: now})
		case stateExpired:
			j.outMsgs = s.event(events.TypeDispatchExpired, "dispatch_expired", j, events.DispatchExpired{
				ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID, CodeSeq: dj.CodeSeq,
				Attempts: j.attempts, ExpiresAt: dj.ExpiresAt, ExpiredAt: now})
		}
		if j.status != stateSending {
			continue // already recorded
		}
		if j.result == resultRetry {
			b.Queue(`UPDATE dispatcher.deliveries SET last_error = $3 WHERE challenge_id = $1 AND code_seq = $2`,
				dj.ChallengeID, dj.CodeSeq, truncate(j.reason, 500))
			continue
		}
		b.Queue(`UPDATE dispatcher.deliveries SET status = $3, provider = $4, provider_message_id = $5,
			last_error = $6, completed_at = now() WHERE challenge_id = $1 AND code_seq = $2`,
			dj.ChallengeID, dj.CodeSeq, j.result, j.provider, j.providerMsg, truncate(j.reason, 500))
	}
	if b.Len() == 0 {
		return nil
	}
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return tx.SendBatch(ctx, b).Close() })
}

func (s *Service) event(typ events.Type, idPrefix string, j *job, v any) []*nats.Msg {
	id := fmt.Sprintf("%s:%s:%d", idPrefix, j.job.ChallengeID, j.job.CodeSeq)
	env := events.Envelope{Source: "otpflow/dispatcher", TraceParent: j.msg.Headers().Get(events.HeaderTraceParent)}
	m, err := events.NewMsg(typ, j.job.Tenant, id, j.job.ChallengeID, v, env)
	if err != nil {
		s.log.Error("encode event", "type", typ, "err", err)
		return nil
	}
	return []*nats.Msg{m}
}

// settle publishes the events and then acknowledges, terminates or delays each job. A job
// whose event could not be published is redelivered; its row makes the retry send nothing.
func (s *Service) settle(ctx context.Context, jobs []*job) {
	var msgs []*nats.Msg
	for _, j := range jobs {
		msgs = append(msgs, j.outMsgs...)
	}
	if err := platform.PublishAll(ctx, s.js, msgs); err != nil {
		s.log.Warn("publish delivery events; jobs will be redelivered", "err", err)
		for _, j := range jobs {
			_ = j.msg.NakWithDelay(2 * time.Second)
		}
		return
	}
	for _, j := range jobs {
		s.jobs.WithLabelValues(j.result).Inc()
		switch j.result {
		case stateSent:
			s.log.Info("delivered", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "provider", j.provider)
			_ = j.msg.Ack()
		case stateFailed, stateExpired:
			s.log.Info("dispatch settled", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "result", j.result)
			if j.exhausted {
				// Transient failures used up the deliveries: park the job with its last
				// error in OTP_DLQ for an operator to redrive.
				if err := platform.DeadLetter(ctx, s.js, j.msg, j.job.Tenant, j.reason); err != nil {
					s.log.Error("dead-letter", "challenge_id", j.job.ChallengeID, "err", err)
				}
				continue
			}
			_ = j.msg.TermWithReason(j.result)
		case resultRetry:
			delay := platform.RetryDelay(j.md.NumDelivered, 30*time.Second)
			// Never schedule past expiry: the delivery at expiry reports dispatch_expired.
			if until := time.Until(j.job.ExpiresAt); until < delay {
				delay = max(until, 0) + 100*time.Millisecond
			}
			_ = j.msg.NakWithDelay(delay)
		}
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
