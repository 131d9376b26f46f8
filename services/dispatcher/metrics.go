package dispatcher

import (
	"context"
	"sync"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// metrics are the dispatcher's own series; the consumer's settle counts come from platform.
type metrics struct {
	sends     *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	delivered prometheus.Histogram
	jobs      *prometheus.CounterVec
	fallbacks *prometheus.CounterVec
	breaker   *prometheus.GaugeVec
	ambiguous prometheus.Counter
	// recordRetries counts failed attempts to record results (record.go).
	recordRetries prometheus.Counter
	// feedbackReads counts SES notifications read, by the kind of their otp.feedback,
	// ignored, dead_lettered or receive_failed (feedback.go).
	feedbackReads *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) metrics {
	m := metrics{
		sends: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_sends_total", Help: "Provider calls by provider and outcome (ok or failure class).",
		}, []string{"provider", "outcome"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "otpflow_dispatcher_send_seconds", Help: "Latency of one provider call.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}, []string{"provider"}),
		delivered: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "otpflow_dispatcher_delivery_seconds",
			Help:    "From the code's issue (the issuer's clock) to the provider's acceptance, for every job recorded as sent.",
			Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300},
		}),
		jobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_jobs_total", Help: "Dispatch job deliveries settled, by result; exhausted: a job the server gave up after its deliveries with none settled, run again here.",
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
		recordRetries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_record_retries_total",
			Help: "Failed attempts to record send results; the jobs are kept in progress and the record retried.",
		}),
		feedbackReads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_dispatcher_feedback_total",
			Help: "SES event notifications read from OTP_SES_FEEDBACK_QUEUE_URL: by feedback kind, or ignored, not_ours, dead_lettered, store_failed, delete_failed, receive_failed, cert_failed.",
		}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.sends, m.latency, m.delivered, m.jobs, m.fallbacks, m.breaker, m.ambiguous, m.recordRetries, m.feedbackReads)
	}
	return m
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

// instrumented counts and times every call of one provider and adds it to the send's
// call log. It sits inside the provider's guard, so the log holds every call, retries
// included: the one record of provider attempts the delivery events carry.
type instrumented struct {
	p  mailer.Provider
	m  *metrics
	tr trace.Tracer
}

func (i *instrumented) Name() string { return i.p.Name() }
func (i *instrumented) Send(ctx context.Context, m *mailer.Message) (mailer.Receipt, error) {
	// The attempt's span names the provider and the outcome class, never the address,
	// the code or the provider's error text (which may quote the address).
	ctx, span := i.tr.Start(ctx, "provider "+i.p.Name(), trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attribute.String("otpflow.provider", i.p.Name())))
	defer span.End()
	start := time.Now()
	r, err := i.p.Send(ctx, m)
	i.m.latency.WithLabelValues(i.p.Name()).Observe(time.Since(start).Seconds())
	outcome := "ok"
	if err != nil {
		outcome = string(mailer.ClassOf(err))
		span.SetStatus(codes.Error, "provider failed: "+outcome)
	}
	span.SetAttributes(attribute.String("otpflow.provider.outcome", outcome))
	i.m.sends.WithLabelValues(i.p.Name(), outcome).Inc()
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

func withCallLog(ctx context.Context) (context.Context, *callLog) {
	l := &callLog{}
	return context.WithValue(ctx, callLogKey{}, l), l
}

func (l *callLog) add(a events.ProviderAttempt) {
	l.mu.Lock()
	l.calls = append(l.calls, a)
	l.mu.Unlock()
}

func (l *callLog) list() []events.ProviderAttempt {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls
}
