// Package dispatcher mails the codes: it takes dispatch jobs from the OTP_DISPATCH work
// queue, unseals the code, renders the mail and sends it through the provider chain,
// and reports otp.delivered, otp.delivery_failed or otp.dispatch_expired.
//
// A job goes through three stages, each batched: admit (decode, claim a lease on the
// delivery row, all claims of a pull in one transaction; admit.go), send (up to
// Concurrency at a time, each provider guarded by retries, a breaker and a token bucket;
// send.go), and record (the results that are ready, in one transaction, then the events,
// then each delivery settled; record.go). A slow send holds only its own slot, never a
// batch. The SQL lives in store.go, the metrics in metrics.go.
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

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
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
	// FeedbackQueue reads the SES event notifications of FeedbackQueueURL
	// (OTP_SES_FEEDBACK_QUEUE_URL, feedback.go); nil: none are read.
	FeedbackQueue    FeedbackQueue
	FeedbackQueueURL string
	// FeedbackSignatures takes only notifications SNS signed for the configuration set's
	// topic (OTP_SES_FEEDBACK_TOPIC_ARN); required in production. Nil: notifications are
	// taken unsigned (a local emulator), with a warning at start.
	FeedbackSignatures *sesfeedback.Verifier
	// Providers in failover order (OTP_PROVIDERS). Each is wrapped in a mailer.Guard with
	// the policy Guards names for it.
	Providers []mailer.Provider
	Guards    map[string]mailer.GuardConfig
	// RateSources read a provider's send quota at start (SES GetAccount) when no rate
	// is configured; the local bucket is set to 80% of it.
	RateSources map[string]func(context.Context) (float64, error)
	From        string
	// Concurrency is the number of sends in flight per process (OTP_DISPATCH_CONCURRENCY;
	// default DefaultConcurrency), and the batch its consumer hands over.
	Concurrency int
	// TemplateDir holds tenant overrides: <dir>/<tenant>/<locale>/{subject.txt,body.txt,body.html}.
	TemplateDir string
	// Policies per tenant (OTP_TENANTS_FILE): sender, default locale, template directory.
	Policies *policy.Set
	// Lease is how long a claim keeps other dispatchers off a job; default the
	// consumer's AckWait. Every send finishes well inside it.
	Lease time.Duration
	// MaxDeliver caps the deliveries of a job before it goes to OTP_DLQ: the provisioned
	// consumer's (OTP_DISPATCH_MAX_DELIVER at provisioning), which Run reads when it binds;
	// before that the contract's DispatcherConsumer.MaxDeliver.
	MaxDeliver int
	Streams    events.StreamOptions
	// Subjects hashes the recipient of a dead-lettered job for its DLQ header
	// (OTP_SUBJECT_KEY); DLQKey seals the job in OTP_DLQ (OTP_DLQ_KEY). Both required.
	Subjects *keys.Subjects
	DLQKey   *keys.Sealer
	// Tracer gets a "dispatch" span per job and a child span per provider attempt; nil
	// records nothing.
	Tracer trace.Tracer
}

// Service is one dispatcher process. Any number share the durable consumer.
type Service struct {
	cfg    Config
	store  *store
	js     jetstream.JetStream
	log    *slog.Logger
	reg    prometheus.Registerer
	chain  *mailer.Chain
	guards []*mailer.Guard
	tmpl   *Templates
	now    func() time.Time

	slots    chan struct{}
	inflight sync.WaitGroup
	results  chan *job // the record stage's input, for jobs run again (keep.go)

	mu       sync.Mutex
	inHand   map[deliveryKey]bool // claimed here, result not yet recorded
	kept     map[*job]*time.Timer // on their last delivery, waiting to run again
	stopping bool                 // no more keeping: shutdown began

	metrics
}

// New returns a dispatcher; Run starts it. The schema must be migrated.
func New(cfg Config, pool *pgxpool.Pool, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Service, error) {
	if cfg.Sealer == nil || cfg.Subjects == nil || cfg.DLQKey == nil || len(cfg.Providers) == 0 || cfg.From == "" {
		return nil, errors.New("dispatcher: seal key, subject key, DLQ key, providers and sender are required")
	}
	if cfg.Concurrency < 1 {
		cfg.Concurrency = DefaultConcurrency
	}
	cfg.Tracer = platform.Tracer(cfg.Tracer)
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
		cfg: cfg, store: &store{pool: pool}, js: js, log: log, reg: reg, tmpl: tmpl, now: time.Now,
		slots:  make(chan struct{}, cfg.Concurrency),
		inHand: map[deliveryKey]bool{}, kept: map[*job]*time.Timer{},
		metrics: newMetrics(reg),
	}
	var chain []mailer.Provider
	for _, p := range cfg.Providers {
		gc := cfg.Guards[p.Name()]
		gc.OnStateChange = func(name, from, to string) {
			s.log.Warn("circuit breaker", "provider", name, "from", from, "to", to)
			s.breaker.WithLabelValues(name).Set(breakerValue(to))
		}
		g := mailer.NewGuard(&instrumented{p: p, m: &s.metrics, tr: cfg.Tracer}, gc)
		s.breaker.WithLabelValues(p.Name()).Set(0)
		s.guards = append(s.guards, g)
		chain = append(chain, g)
	}
	s.chain = &mailer.Chain{Providers: chain}
	return s, nil
}

// Run consumes dispatch jobs until ctx is cancelled, then finishes the sends in hand.
func (s *Service) Run(ctx context.Context) error {
	cons, err := platform.Bind(ctx, s.js, events.StreamDispatch, events.DispatcherConsumer)
	if err != nil {
		return platform.SetupError(ctx, err)
	}
	// The consumer as provisioned says how many deliveries a job gets.
	if info := cons.CachedInfo(); info != nil && info.Config.MaxDeliver > 0 {
		s.cfg.MaxDeliver = info.Config.MaxDeliver
	}
	setupCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
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
	// Erasures run beside the jobs; if they stop with an error, so does the dispatcher.
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	erasures := make(chan error, 1)
	go func() {
		err := platform.RunErasures(purgeCtx, s.js, platform.ErasureConfig{Service: "dispatcher", Streams: s.cfg.Streams,
			Erase: s.Erase, DeadLetters: &platform.DeadLetters{Sealer: s.cfg.DLQKey}, Log: s.log, Reg: s.reg})
		if err != nil {
			stopRun()
		}
		erasures <- err
	}()

	var feedback sync.WaitGroup
	if s.cfg.FeedbackQueue != nil {
		feedback.Go(func() { s.readFeedback(purgeCtx) })
	}
	defer func() {
		stopPurge() // ends the reader
		feedback.Wait()
	}()

	results := make(chan *job, 4*s.cfg.Concurrency)
	s.results = results
	recorded := make(chan struct{})
	go func() {
		defer close(recorded)
		s.recordLoop(results)
	}()
	// Little prefetch: a pulled job's AckWait runs until admit takes it. A job is kept in
	// progress for as long as its code may live: a job whose record waits for the
	// database, or that is kept on its last delivery, must not be redelivered (and
	// perhaps mailed again) before its code expired.
	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: events.ConsumerDispatcher,
		BatchSize: s.cfg.Concurrency, Prefetch: s.cfg.Concurrency, JS: s.js, Log: s.log, Reg: s.reg,
		MaxInProgress: events.MaxCodeTTL + 2*s.cfg.Lease, NoRecover: true,
		DeadLetters: &platform.DeadLetters{Sealer: s.cfg.DLQKey, Recipient: s.jobRecipient}})
	exhausted := make(chan error, 1)
	go func() { exhausted <- s.readExhausted(runCtx, c, results) }()
	err = c.Run(runCtx, func(ctx context.Context, batch []*platform.Delivery) error {
		return s.admit(ctx, batch, results)
	})
	stopRun()
	err = errors.Join(err, <-exhausted)
	s.stopKeeping()
	s.inflight.Wait()
	close(results)
	<-recorded
	stopPurge()
	return errors.Join(err, <-erasures)
}

// readExhausted runs, through the dispatcher's durable on OTP_ADVISORIES, each job its
// durable on OTP_DISPATCH gave up after its deliveries with none settled (a dispatcher
// died on its last delivery) once more, as its last delivery, to its terminal event
// (platform.Consumer.Redelivered): claimed as any delivery is, so a send another process
// may still have in flight is waited for until its lease ends, and then sent again, as
// after any crash. A job this process holds is left to its stage. Until the durable
// exists (a provisioning of an earlier release) the dispatcher runs without it, saying so.
func (s *Service) readExhausted(ctx context.Context, live *platform.Consumer, results chan<- *job) error {
	cc := events.DispatcherExhaustedConsumer
	logged := false
	return platform.RunExhausted(ctx, platform.ExhaustedConfig{Consumer: cc, Stream: events.StreamDispatch,
		Owns:  func(durable string) bool { return durable == events.ConsumerDispatcher },
		Holds: func(_ string, seq uint64) bool { return live.Holds(seq) },
		Redeliver: func(ctx context.Context, m *jetstream.RawStreamMsg, deliveries uint64, advisory *platform.Delivery) error {
			d := live.Redelivered(m, events.StreamDispatch, deliveries, advisory)
			if n := advisory.Meta().NumDelivered; n > maxHandovers {
				// Handed over this often and never settled: each handover died (a job
				// that crashes its dispatcher?). Each cost a re-send after its lease; no
				// more: the job goes to OTP_DLQ.
				s.jobs.WithLabelValues("dead_lettered").Inc()
				_, tenant, _ := events.SplitSubject(m.Subject)
				d.Settle(platform.DeadLetter(tenant, fmt.Sprintf("%s: given up after its deliveries, and handed over again %d times with none settled",
					events.ConsumerDispatcher, n-1)))
				return nil
			}
			s.jobs.WithLabelValues("exhausted").Inc()
			if err := s.admit(ctx, []*platform.Delivery{d}, results); err != nil {
				// A claim the database refuses: the job goes to OTP_DLQ, as on any
				// delivery, and not the advisory.
				d.Settle(platform.Failed(err))
			}
			return nil
		},
		MaxInProgress: events.MaxCodeTTL + 2*s.cfg.Lease,
		Missing: func(err error) {
			if err != nil && !logged {
				s.log.Error("the dispatcher's consumer on OTP_ADVISORIES is missing: a job given up after its deliveries is not run to its outcome until it is provisioned",
					"consumer", cc.Durable, "err", err)
			}
			logged = err != nil
		},
		JS: s.js, DeadLetters: &platform.DeadLetters{Sealer: s.cfg.DLQKey, Recipient: s.jobRecipient}, Log: s.log, Reg: s.reg})
}

// maxHandovers caps how often a job given up after its deliveries is handed over again
// (readExhausted): each handover that dies re-sends after its lease.
const maxHandovers = 3

// Purge deletes delivery rows of codes that expired more than retention ago: past every
// redelivery, nothing can ask for them again.
func (s *Service) Purge(ctx context.Context) (int64, error) {
	return s.store.purge(ctx, platform.Retention)
}
