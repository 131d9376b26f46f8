// Package dispatcher mails the codes: it takes dispatch jobs from the OTP_DISPATCH work
// queue, unseals the code, renders the mail and sends it through the provider chain,
// and reports otp.delivered, otp.delivery_failed or otp.dispatch_expired.
//
// A job goes through three stages, each batched: admit (decode, claim a lease on the
// delivery row, all claims of a pull in one transaction), send (up to Concurrency at a
// time, each provider guarded by retries, a breaker and a token bucket), and record (the
// results that are ready, in one transaction, then the events, then the acks). A slow
// send holds only its own slot, never a batch.
package dispatcher

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
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
	Sealer *keys.Sealer
	// Providers in failover order (OTP_PROVIDERS). Each is wrapped in a mailer.Guard with
	// the policy Guards names for it.
	Providers []mailer.Provider
	Guards    map[string]mailer.GuardConfig
	// RateSources read a provider's send quota at start (SES GetAccount) when no rate
	// is configured; the local bucket is set to 80% of it.
	RateSources map[string]func(context.Context) (float64, error)
	From        string
	// Concurrency is the number of sends in flight per process (OTP_DISPATCH_CONCURRENCY).
	Concurrency int
	// TemplateDir holds tenant overrides: <dir>/<tenant>/<locale>/{subject.txt,body.txt,body.html}.
	TemplateDir string
	// Policies per tenant (OTP_TENANTS_FILE): sender, default locale, template directory.
	Policies *policy.Set
	// Lease is how long a claim keeps other dispatchers off a job; default the
	// consumer's AckWait. Every send finishes well inside it.
	Lease time.Duration
	// MaxDeliver caps the deliveries of a job before it goes to OTP_DLQ; default the
	// contract's DispatcherConsumer.MaxDeliver.
	MaxDeliver int
	Streams    events.StreamOptions
}

// Service is one dispatcher process. Any number share the durable consumer.
type Service struct {
	cfg    Config
	pool   *pgxpool.Pool
	js     jetstream.JetStream
	log    *slog.Logger
	reg    prometheus.Registerer
	chain  *mailer.Chain
	guards []*mailer.Guard
	tmpl   *Templates
	now    func() time.Time

	slots    chan struct{}
	inflight sync.WaitGroup

	sends     *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	jobs      *prometheus.CounterVec
	fallbacks *prometheus.CounterVec
	breaker   *prometheus.GaugeVec
	ambiguous prometheus.Counter
}

// New returns a dispatcher; Run starts it. The schema must be migrated.
func New(cfg Config, pool *pgxpool.Pool, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Service, error) {
	if cfg.Sealer == nil || len(cfg.Providers) == 0 || cfg.From == "" {
		return nil, errors.New("dispatcher: seal key, providers and sender are required")
	}
	if cfg.Concurrency < 1 {
		cfg.Concurrency = 16
	}
	if cfg.Lease == 0 {
		cfg.Lease = events.DispatcherConsumer.AckWait
	}
	if cfg.MaxDeliver == 0 {
		cfg.MaxDeliver = events.DispatcherConsumer.MaxDeliver
	}
	if cfg.Policies == nil {
		cfg.Policies = policy.Defaults()
	}
	tmpl, err := LoadTemplates(cfg.TemplateDir, cfg.Policies)
	if err != nil {
		return nil, err
	}
	s := &Service{
		cfg: cfg, pool: pool, js: js, log: log, reg: reg, tmpl: tmpl, now: time.Now,
		slots: make(chan struct{}, cfg.Concurrency),
		sends: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_sends_total", Help: "Provider calls by provider and outcome (ok or failure class).",
		}, []string{"provider", "outcome"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "otpflow_dispatcher_send_seconds", Help: "Latency of one provider call.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}, []string{"provider"}),
		jobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_jobs_total", Help: "Dispatch job deliveries settled, by result.",
		}, []string{"result"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_fallbacks_total", Help: "Mails sent by a later provider after the first failed.",
		}, []string{"from", "to"}),
		breaker: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "otpflow_dispatcher_breaker_state", Help: "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.",
		}, []string{"provider"}),
		ambiguous: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_ambiguous_total", Help: "Sends handed over without a final answer.",
		}),
	}
	var chain []mailer.Provider
	for _, p := range cfg.Providers {
		gc := cfg.Guards[p.Name()]
		gc.OnStateChange = func(name, from, to string) {
			s.log.Warn("circuit breaker", "provider", name, "from", from, "to", to)
			s.breaker.WithLabelValues(name).Set(breakerValue(to))
		}
		g := mailer.NewGuard(&instrumented{p: p, s: s}, gc)
		s.breaker.WithLabelValues(p.Name()).Set(0)
		s.guards = append(s.guards, g)
		chain = append(chain, g)
	}
	s.chain = &mailer.Chain{Providers: chain}
	if reg != nil {
		reg.MustRegister(s.sends, s.latency, s.jobs, s.fallbacks, s.breaker, s.ambiguous)
	}
	return s, nil
}

func breakerValue(state string) float64 {
	switch state {
	case "half-open":
		return 1
	case "open":
		return 2
	}
	return 0
}

// instrumented counts and times every call of one provider.
type instrumented struct {
	p mailer.Provider
	s *Service
}

func (i *instrumented) Name() string { return i.p.Name() }
func (i *instrumented) Send(ctx context.Context, m *mailer.Message) (mailer.Receipt, error) {
	start := time.Now()
	r, err := i.p.Send(ctx, m)
	i.s.latency.WithLabelValues(i.p.Name()).Observe(time.Since(start).Seconds())
	outcome := "ok"
	if err != nil {
		outcome = string(mailer.ClassOf(err))
	}
	i.s.sends.WithLabelValues(i.p.Name(), outcome).Inc()
	if log, ok := ctx.Value(callLogKey{}).(*callLog); ok {
		log.add(events.ProviderAttempt{Provider: i.p.Name(), Outcome: outcome, At: start.UTC()})
	}
	return r, err
}

// callLog collects the provider calls of one send, for the delivery events.
type callLog struct {
	mu    sync.Mutex
	calls []events.ProviderAttempt
}

type callLogKey struct{}

func (l *callLog) add(a events.ProviderAttempt) {
	l.mu.Lock()
	l.calls = append(l.calls, a)
	l.mu.Unlock()
}

// Run consumes dispatch jobs until ctx is cancelled, then finishes the sends in hand.
func (s *Service) Run(ctx context.Context) error {
	setupCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := platform.EnsureStreams(setupCtx, s.js, s.cfg.Streams); err != nil {
		return platform.SetupError(ctx, err)
	}
	cc := events.DispatcherConsumer
	cc.MaxDeliver = s.cfg.MaxDeliver
	cons, err := platform.EnsureConsumer(setupCtx, s.js, events.StreamDispatch, cc)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	if s.reg != nil {
		if err := s.reg.Register(platform.NewConsumerLag(cons, events.StreamDispatch, events.ConsumerDispatcher)); err != nil {
			s.log.Warn("consumer lag metric", "err", err)
		}
	}
	for i, p := range s.cfg.Providers {
		if src := s.cfg.RateSources[p.Name()]; src != nil {
			if r, err := src(setupCtx); err != nil {
				s.log.Warn("read provider quota; no local rate limit", "provider", p.Name(), "err", err)
			} else {
				s.guards[i].SetRate(r * 0.8)
				s.log.Info("provider quota", "provider", p.Name(), "max_send_rate", r, "local_rate", r*0.8)
			}
		}
	}
	s.log.Info("dispatcher consuming", "stream", events.StreamDispatch, "consumer", events.ConsumerDispatcher,
		"concurrency", s.cfg.Concurrency)

	purgeCtx, stopPurge := context.WithCancel(ctx)
	defer stopPurge()
	go func() { _ = platform.PurgeEvery(purgeCtx, 10*time.Minute, s.log, s.Purge) }()

	results := make(chan *job, 4*s.cfg.Concurrency)
	recorded := make(chan struct{})
	go func() {
		defer close(recorded)
		s.recordLoop(results)
	}()
	// Little prefetch: a pulled job's AckWait runs until admit takes it.
	err = platform.ConsumePrefetch(ctx, cons, s.cfg.Concurrency, s.cfg.Concurrency, func(ctx context.Context, batch []jetstream.Msg) {
		s.admit(ctx, batch, results)
	})
	s.inflight.Wait()
	close(results)
	<-recorded
	return err
}

// job is one pulled dispatch job on its way through the stages.
type job struct {
	msg jetstream.Msg
	md  *jetstream.MsgMetadata
	job events.DispatchJob

	// The delivery row as found when claiming.
	row     deliveryRow
	claimed bool // this worker holds the lease
	// expiresAt is the code's expiry and sendBy the last instant a send may run, both
	// read against the database clock at the claim and kept on the local monotonic clock.
	expiresAt time.Time
	sendBy    time.Time

	// What happened; record and settle act on it.
	result      string
	reason      string
	provider    string
	providerMsg string
	unconfirmed bool
	exhausted   bool
	holdFor     time.Duration
	release     func() // frees the send slot; set while a send's result is unrecorded
	calls       []events.ProviderAttempt
}

type deliveryRow struct {
	exists      bool
	status      string
	attempts    int
	provider    string
	providerMsg string
	leaseUntil  time.Time
	ambiguous   int
	confirmed   bool
	lastError   string
}

// expiryMargin: a code with less life left than this is not mailed (nobody could type
// it in time) and no mail goes out after its code expired, whatever the send takes.
const expiryMargin = 2 * time.Second

// Delivery row states and job results.
const (
	stateSending = "sending"
	stateSent    = "sent"
	stateFailed  = "failed"
	stateExpired = "expired"

	resultRetry     = "retry"     // transient failure: redeliver later
	resultAmbiguous = "ambiguous" // no final answer: one deliberate re-send later
	resultHeld      = "held"      // another dispatcher holds the lease
)

// admit decodes a pulled batch, takes a send slot per job (this is the backpressure: a
// full process stops pulling), claims all of them in one transaction and starts the sends.
func (s *Service) admit(ctx context.Context, batch []jetstream.Msg, results chan<- *job) {
	var jobs []*job
	for _, m := range batch {
		md, err := m.Metadata()
		if err != nil {
			_ = m.NakWithDelay(time.Second)
			continue
		}
		dj, tenant, err := s.open(m)
		if err != nil {
			// A job that does not open under its routing fields was forged, edited or
			// written in an old format: nothing in it can be trusted, so nothing is sent.
			s.log.Error("refused dispatch job", "seq", md.Sequence.Stream, "err", err)
			s.jobs.WithLabelValues("dead_lettered").Inc()
			if err := platform.DeadLetter(ctx, s.js, m, tenant, "refused dispatch job: "+err.Error()); err != nil {
				s.log.Error("dead-letter", "err", err)
			}
			continue
		}
		jobs = append(jobs, &job{msg: m, md: md, job: dj})
	}
	if len(jobs) == 0 {
		return
	}
	s.acquire(jobs)
	release := func() { <-s.slots }
	if err := s.claim(ctx, jobs); err != nil {
		s.log.Error("claim deliveries", "jobs", len(jobs), "err", err)
		for _, j := range jobs {
			release()
			_ = j.msg.NakWithDelay(platform.RetryDelay(j.md.NumDelivered, 30*time.Second))
		}
		return
	}
	for _, j := range jobs {
		switch {
		case !j.claimed:
			release()
			results <- j
		case time.Until(j.sendBy) <= 0:
			j.result = stateExpired
			release()
			results <- j
		default:
			// The slot is held until the result is recorded, so at most Concurrency
			// mails per process are ever sent and not yet recorded: the bound of
			// the double-send window when a process dies.
			j.release = release
			s.inflight.Add(1)
			go func() {
				defer s.inflight.Done()
				s.send(ctx, j)
				results <- j
			}()
		}
	}
}

// open decodes a pulled job and unseals it. The job must name its subject's tenant outside
// and inside the seal.
func (s *Service) open(m jetstream.Msg) (events.DispatchJob, string, error) {
	_, tenant, err := events.SplitSubject(m.Subject())
	if err != nil {
		return events.DispatchJob{}, "", err
	}
	sealed, err := events.DecodeSealedDispatch(m.Data())
	if err != nil {
		return events.DispatchJob{}, tenant, err
	}
	if sealed.Tenant != tenant {
		return events.DispatchJob{}, tenant, fmt.Errorf("job tenant %q does not match its subject", sealed.Tenant)
	}
	dj, err := s.cfg.Sealer.OpenJob(sealed)
	if err != nil {
		return events.DispatchJob{}, tenant, err
	}
	return dj, tenant, nil
}

// acquire takes a send slot per job, keeping the jobs' AckWait from running out while
// every slot is busy with slow providers.
func (s *Service) acquire(jobs []*job) {
	tick := time.NewTicker(events.DispatcherConsumer.AckWait / 4)
	defer tick.Stop()
	for range jobs {
		for taken := false; !taken; {
			select {
			case s.slots <- struct{}{}:
				taken = true
			case <-tick.C:
				for _, j := range jobs {
					_ = j.msg.InProgress()
				}
			}
		}
	}
}

type deliveryKey struct {
	challenge string
	seq       int
}

// claim locks the delivery rows of the batch and takes a lease on each job that nobody
// else holds and that has not been settled, all in one transaction.
func (s *Service) claim(ctx context.Context, jobs []*job) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		lock := &pgx.Batch{}
		seen := map[deliveryKey]bool{}
		var first []*job
		for _, j := range jobs {
			j.claimed, j.row, j.result = false, deliveryRow{}, ""
			k := deliveryKey{j.job.ChallengeID, j.job.CodeSeq}
			if seen[k] {
				// The same job twice in one pull: handle it again once the first settles.
				j.result, j.holdFor = resultHeld, time.Second
				continue
			}
			seen[k] = true
			first = append(first, j)
			lock.Queue(`SELECT status, attempts, provider, provider_message_id, lease_until, ambiguous, confirmed, last_error
				FROM dispatcher.deliveries WHERE challenge_id = $1 AND code_seq = $2 FOR UPDATE`, k.challenge, k.seq)
		}
		res := tx.SendBatch(ctx, lock)
		for _, j := range first {
			r := &j.row
			err := res.QueryRow().Scan(&r.status, &r.attempts, &r.provider, &r.providerMsg, &r.leaseUntil, &r.ambiguous, &r.confirmed, &r.lastError)
			switch {
			case errors.Is(err, pgx.ErrNoRows):
			case err != nil:
				res.Close()
				return fmt.Errorf("lock deliveries: %w", err)
			default:
				r.exists = true
			}
		}
		if err := res.Close(); err != nil {
			return err
		}

		// Leases and expiry run on the database clock, shared by every process, read once
		// the rows are locked (a wait for another dispatcher's locks must not make it
		// stale). The local instant is taken first, so the deadlines below err early.
		local := time.Now()
		var now time.Time
		if err := tx.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&now); err != nil {
			return fmt.Errorf("read the database clock: %w", err)
		}
		writes := &pgx.Batch{}
		for _, j := range jobs {
			// The same instants on this process's monotonic clock.
			j.expiresAt = local.Add(j.job.ExpiresAt.Sub(now))
			j.sendBy = local.Add(min(j.job.ExpiresAt.Add(-expiryMargin).Sub(now), s.cfg.Lease*3/4))
		}
		for _, j := range first {
			r, dj := j.row, j.job
			switch {
			case !r.exists:
				writes.Queue(`INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id, status, attempts,
					expires_at, claimed_at, lease_until) VALUES ($1, $2, $3, $4, 'sending', 1, $5, $6, $7)`,
					dj.ChallengeID, dj.CodeSeq, dj.Tenant, dj.RequestID, dj.ExpiresAt, now, now.Add(s.cfg.Lease))
				j.claimed, j.row.attempts = true, 1
			case r.status != stateSending:
				j.result = r.status // settled before: report it again, send nothing
			case r.leaseUntil.After(now):
				j.result, j.holdFor = resultHeld, r.leaseUntil.Sub(now)+100*time.Millisecond
			default:
				writes.Queue(`UPDATE dispatcher.deliveries SET attempts = attempts + 1, claimed_at = $3, lease_until = $4
					WHERE challenge_id = $1 AND code_seq = $2`, dj.ChallengeID, dj.CodeSeq, now, now.Add(s.cfg.Lease))
				j.claimed, j.row.attempts = true, r.attempts+1
			}
		}
		return tx.SendBatch(ctx, writes).Close()
	})
}

// send mails one job's code through the chain, telling JetStream the job is in progress
// so a slow provider never causes a redelivery.
func (s *Service) send(ctx context.Context, j *job) {
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		t := time.NewTicker(events.DispatcherConsumer.AckWait / 4)
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
	// The whole chain finishes well inside the lease, so no other dispatcher can take
	// the job while this one may still send it, and before the code's expiry less the
	// margin, so no mail is handed over after its code expired.
	ctx, cancel := context.WithDeadline(ctx, j.sendBy)
	defer cancel()

	code := j.job.Code
	p := s.cfg.Policies.For(j.job.Tenant)
	locale, from := j.job.Locale, s.cfg.From
	if locale == "" {
		locale = p.Locale
	}
	if p.Sender != "" {
		from = p.Sender
	}
	minutes := int(j.job.ExpiresAt.Sub(j.job.IssuedAt).Round(time.Minute) / time.Minute)
	subject, text, html, err := s.tmpl.Render(j.job.Tenant, locale, TemplateData{Code: code, Minutes: max(minutes, 1), Purpose: j.job.Purpose, Tenant: j.job.Tenant})
	if err != nil {
		j.result, j.reason = stateFailed, "render: "+err.Error()
		return
	}
	m := &mailer.Message{
		From: from, To: j.job.Recipient, Subject: subject, Text: text, HTML: html,
		ID:      fmt.Sprintf("%s:%d", j.job.ChallengeID, j.job.CodeSeq),
		Headers: map[string]string{"X-Otp-Challenge-Id": j.job.ChallengeID, "X-Otp-Tenant": j.job.Tenant},
		Tags:    map[string]string{"tenant": j.job.Tenant, "purpose": j.job.Purpose, "challenge_id": j.job.ChallengeID},
	}
	calls := &callLog{}
	res, err := s.chain.Send(context.WithValue(ctx, callLogKey{}, calls), m)
	j.calls = calls.calls
	if err == nil {
		j.result, j.provider, j.providerMsg = stateSent, res.Provider, res.Receipt.MessageID
		if first := res.Attempts[0].Provider; first != res.Provider {
			s.fallbacks.WithLabelValues(first, res.Provider).Inc()
		}
		return
	}
	j.reason = err.Error()
	var se *mailer.SendError
	if errors.As(err, &se) {
		j.provider = se.Provider
	}
	switch mailer.ClassOf(err) {
	case mailer.Permanent:
		j.result = stateFailed
	case mailer.Ambiguous:
		s.ambiguous.Inc()
		if j.row.ambiguous >= 1 {
			// This was the one re-send, and again no answer: count it as sent rather
			// than mail the code a third time.
			j.result, j.unconfirmed = stateSent, true
			return
		}
		j.result = resultAmbiguous
		s.log.Warn("send outcome unknown; one re-send follows", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "provider", j.provider)
	default:
		j.result = resultRetry
		s.log.Warn("every provider failed; will retry", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq,
			"delivery", j.md.NumDelivered, "err", err)
	}
}

// recordLoop records results in batches of whatever is ready, until results is closed.
func (s *Service) recordLoop(results <-chan *job) {
	ctx := context.Background()
	for j := range results {
		batch := []*job{j}
	more:
		for len(batch) < 200 {
			select {
			case j, ok := <-results:
				if !ok {
					break more
				}
				batch = append(batch, j)
			default:
				break more
			}
		}
		err := s.record(ctx, batch)
		for _, j := range batch {
			if j.release != nil {
				j.release()
			}
		}
		if err != nil {
			// Mails that went out may go out again on redelivery: with the kill of a
			// process, the one window in which a code can be mailed twice.
			s.log.Error("record deliveries", "jobs", len(batch), "err", err)
			for _, j := range batch {
				_ = j.msg.NakWithDelay(platform.RetryDelay(j.md.NumDelivered, 30*time.Second))
			}
			continue
		}
		s.settle(ctx, batch)
	}
}

// record writes the results of the jobs this worker claimed in one transaction and
// builds the events to publish.
func (s *Service) record(ctx context.Context, jobs []*job) error {
	b := &pgx.Batch{}
	for _, j := range jobs {
		if j.result == resultRetry && j.md.NumDelivered >= uint64(s.cfg.MaxDeliver) {
			j.result, j.exhausted = stateFailed, true
			j.reason = "deliveries exhausted: " + j.reason
		}
		if !j.claimed {
			if j.result == stateSent || j.result == stateFailed {
				j.provider, j.providerMsg, j.unconfirmed, j.reason = j.row.provider, j.row.providerMsg, !j.row.confirmed, j.row.lastError
			}
			continue
		}
		dj := j.job
		switch j.result {
		case stateSent, stateFailed, stateExpired:
			b.Queue(`UPDATE dispatcher.deliveries SET status = $3, provider = $4, provider_message_id = $5, last_error = $6,
				confirmed = $7, completed_at = now(), lease_until = now() WHERE challenge_id = $1 AND code_seq = $2`,
				dj.ChallengeID, dj.CodeSeq, j.result, j.provider, j.providerMsg, events.Reason(j.reason, 500), !j.unconfirmed)
		case resultAmbiguous:
			b.Queue(`UPDATE dispatcher.deliveries SET ambiguous = ambiguous + 1, last_error = $3, lease_until = now()
				WHERE challenge_id = $1 AND code_seq = $2`, dj.ChallengeID, dj.CodeSeq, events.Reason(j.reason, 500))
		case resultRetry:
			b.Queue(`UPDATE dispatcher.deliveries SET last_error = $3, lease_until = now() WHERE challenge_id = $1 AND code_seq = $2`,
				dj.ChallengeID, dj.CodeSeq, events.Reason(j.reason, 500))
		}
	}
	if b.Len() == 0 {
		return nil
	}
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return tx.SendBatch(ctx, b).Close() })
}

// event builds the event that reports a settled job; the id is the same every time the
// job is reported, so a re-report after a crash is dropped by the stream.
func (s *Service) event(j *job) *nats.Msg {
	dj, now := j.job, s.now().UTC()
	var typ events.Type
	var v any
	switch j.result {
	case stateSent:
		typ, v = events.TypeDelivered, events.Delivered{ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID,
			CodeSeq: dj.CodeSeq, Provider: j.provider, ProviderMessageID: j.providerMsg, Attempts: j.row.attempts,
			Unconfirmed: j.unconfirmed, ProviderAttempts: j.calls, DeliveredAt: now}
	case stateFailed:
		typ, v = events.TypeDeliveryFailed, events.DeliveryFailed{ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID,
			CodeSeq: dj.CodeSeq, Provider: j.provider, Reason: events.Reason(j.reason, 500), Permanent: !j.exhausted,
			Attempts: j.row.attempts, FailedAt: now, ProviderAttempts: j.calls}
	case stateExpired:
		typ, v = events.TypeDispatchExpired, events.DispatchExpired{ChallengeID: dj.ChallengeID, Tenant: dj.Tenant, RequestID: dj.RequestID,
			CodeSeq: dj.CodeSeq, Attempts: j.row.attempts, ExpiresAt: dj.ExpiresAt, ExpiredAt: now}
	default:
		return nil
	}
	id := fmt.Sprintf("%s:%s:%d", typ[len("otp."):], dj.ChallengeID, dj.CodeSeq)
	env := events.Envelope{Source: "otpflow/dispatcher", TraceParent: j.msg.Headers().Get(events.HeaderTraceParent)}
	m, err := events.NewMsg(typ, dj.Tenant, id, dj.ChallengeID, v, env)
	if err != nil {
		s.log.Error("encode event", "type", typ, "err", err)
		return nil
	}
	return m
}

// settle publishes the events and then acknowledges, terminates or delays each job. A job
// whose event could not be published is redelivered; its row makes the retry send nothing.
func (s *Service) settle(ctx context.Context, jobs []*job) {
	var msgs []*nats.Msg
	for _, j := range jobs {
		if m := s.event(j); m != nil {
			msgs = append(msgs, m)
		}
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
			s.log.Info("delivered", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "provider", j.provider, "unconfirmed", j.unconfirmed)
			_ = j.msg.Ack()
		case stateFailed, stateExpired:
			s.log.Info("dispatch settled", "challenge_id", j.job.ChallengeID, "code_seq", j.job.CodeSeq, "result", j.result, "reason", events.Reason(j.reason, 200))
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
			_ = j.msg.NakWithDelay(s.retryDelay(j))
		case resultAmbiguous:
			_ = j.msg.NakWithDelay(min(2*time.Second, s.untilExpiry(j)))
		case resultHeld:
			_ = j.msg.NakWithDelay(min(j.holdFor, s.untilExpiry(j)))
		}
	}
}

// retryDelay is the redelivery delay after a transient failure: exponential in the
// delivery count (1s, 2s, 4s, ... capped at 30s) with ±20% jitter, and never past the
// code's expiry: the delivery at expiry reports dispatch_expired instead of sending.
func (s *Service) retryDelay(j *job) time.Duration {
	d := platform.RetryDelay(j.md.NumDelivered, 30*time.Second)
	d = time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
	return min(d, s.untilExpiry(j))
}

func (s *Service) untilExpiry(j *job) time.Duration {
	return max(time.Until(j.expiresAt), 0) + 100*time.Millisecond
}

// Purge deletes delivery rows of codes that expired more than retention ago: past every
// redelivery, nothing can ask for them again.
func (s *Service) Purge(ctx context.Context) (int64, error) {
	tag, err := s.pool.Exec(ctx, `DELETE FROM dispatcher.deliveries WHERE expires_at < now() - $1::interval`, platform.Retention)
	return tag.RowsAffected(), err
}
