package mailer

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/sony/gobreaker/v2"
	"golang.org/x/time/rate"
)

// GuardConfig is the failure policy around one provider. Zero values take the defaults.
type GuardConfig struct {
	// RetryBudget bounds the in-process retries of transient failures on this provider
	// (default 2s); after it the chain moves to the next provider. Longer waits go back
	// to the broker, never into a held worker.
	RetryBudget time.Duration
	// MaxRetries caps the retries inside the budget (default 2: three attempts).
	MaxRetries int
	// RetryInitial is the first backoff interval (default 100ms).
	RetryInitial time.Duration

	// Rate is the provider's send quota in messages per second; 0 means no local limit.
	Rate float64
	// MaxTokenWait is the longest a send waits for a token before failing over as
	// throttled (default 1s).
	MaxTokenWait time.Duration

	// BreakerTimeout is how long an open breaker keeps the provider out before half-open
	// probes (default 30s).
	BreakerTimeout time.Duration
	// BreakerFailures is the number of consecutive failures that opens the breaker
	// (default 5); 20 requests with half of them failing in the last 30s open it too.
	BreakerFailures uint32
	// QuotaBackoff keeps a provider whose quota is exhausted out of the way (default 10m).
	QuotaBackoff time.Duration

	// OnStateChange is told every breaker transition ("closed", "half-open", "open").
	OnStateChange func(provider, from, to string)
}

func (c *GuardConfig) setDefaults() {
	if c.RetryBudget == 0 {
		c.RetryBudget = 2 * time.Second
	}
	if c.MaxRetries == 0 {
		c.MaxRetries = 2
	}
	if c.RetryInitial == 0 {
		c.RetryInitial = 100 * time.Millisecond
	}
	if c.MaxTokenWait == 0 {
		c.MaxTokenWait = time.Second
	}
	if c.BreakerTimeout == 0 {
		c.BreakerTimeout = 30 * time.Second
	}
	if c.BreakerFailures == 0 {
		c.BreakerFailures = 5
	}
	if c.QuotaBackoff == 0 {
		c.QuotaBackoff = 10 * time.Minute
	}
}

// Guard wraps a provider with what keeps a bad one from hurting: short retries with
// backoff on transient failures, a token bucket under the provider's quota that slows
// down when the provider throttles, a circuit breaker that keeps a dead provider out of
// the way (a send costs nothing while it is open; half-open probes bring it back), and a
// hold-off after an exhausted quota.
type Guard struct {
	p   Provider
	cfg GuardConfig
	cb  *gobreaker.CircuitBreaker[Receipt]
	lim *rate.Limiter

	mu          sync.Mutex
	heldUntil   time.Time // quota exhausted, or throttled with no configured rate
	lastSlowed  time.Time
	targetLimit rate.Limit
}

// NewGuard wraps p.
func NewGuard(p Provider, cfg GuardConfig) *Guard {
	cfg.setDefaults()
	g := &Guard{p: p, cfg: cfg, lim: rate.NewLimiter(rate.Inf, 1), targetLimit: rate.Inf}
	g.SetRate(cfg.Rate)
	g.cb = gobreaker.NewCircuitBreaker[Receipt](gobreaker.Settings{
		Name:         p.Name(),
		MaxRequests:  2,
		Interval:     30 * time.Second,
		BucketPeriod: 5 * time.Second,
		Timeout:      cfg.BreakerTimeout,
		ReadyToTrip: func(c gobreaker.Counts) bool {
			return c.ConsecutiveFailures >= cfg.BreakerFailures || (c.Requests >= 20 && c.TotalFailures*2 >= c.Requests)
		},
		// A message the provider refuses says nothing about the provider's health.
		IsExcluded: func(err error) bool {
			return ClassOf(err) == Permanent || errors.Is(err, context.Canceled)
		},
		OnStateChange: func(name string, from, to gobreaker.State) {
			if cfg.OnStateChange != nil {
				cfg.OnStateChange(name, from.String(), to.String())
			}
		},
	})
	return g
}

// Name implements Provider.
func (g *Guard) Name() string { return g.p.Name() }

// State is the breaker state: "closed", "half-open" or "open".
func (g *Guard) State() string { return g.cb.State().String() }

// SetRate sets the send quota in messages per second (0: unlimited), e.g. from SES
// GetAccount at start.
func (g *Guard) SetRate(r float64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if r <= 0 {
		g.targetLimit = rate.Inf
	} else {
		g.targetLimit = rate.Limit(r)
	}
	g.lim.SetLimit(g.targetLimit)
	g.lim.SetBurst(max(1, int(r/10)))
}

// Limit is the current local send rate (lower than the quota after throttling).
func (g *Guard) Limit() float64 { return float64(g.lim.Limit()) }

// Send implements Provider.
func (g *Guard) Send(ctx context.Context, m *Message) (Receipt, error) {
	if until := g.held(); !until.IsZero() {
		return Receipt{}, &SendError{Provider: g.Name(), Class: Throttled, Err: fmt.Errorf("held back until %s", until.Format(time.RFC3339))}
	}
	b := backoff.WithContext(backoff.WithMaxRetries(backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(g.cfg.RetryInitial),
		backoff.WithMaxInterval(g.cfg.RetryBudget/2),
		backoff.WithMaxElapsedTime(g.cfg.RetryBudget),
	), uint64(g.cfg.MaxRetries)), ctx)
	var receipt Receipt
	err := backoff.Retry(func() error {
		if err := g.token(ctx); err != nil {
			return backoff.Permanent(err)
		}
		r, err := g.cb.Execute(func() (Receipt, error) { return g.p.Send(ctx, m) })
		if errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
			return backoff.Permanent(&SendError{Provider: g.Name(), Class: ProviderDown, Err: fmt.Errorf("circuit breaker: %w", err)})
		}
		if err == nil {
			receipt = r
			return nil
		}
		switch ClassOf(err) {
		case Transient:
			return err
		case Throttled:
			g.slowDown()
		case QuotaExhausted:
			g.hold(g.cfg.QuotaBackoff)
		}
		return backoff.Permanent(err)
	}, b)
	if err != nil {
		return Receipt{}, asSendError(g.Name(), err)
	}
	return receipt, nil
}

// token waits for the token bucket, at most MaxTokenWait.
func (g *Guard) token(ctx context.Context) error {
	g.recover()
	r := g.lim.Reserve()
	if !r.OK() {
		return &SendError{Provider: g.Name(), Class: Throttled, Err: errors.New("local rate limit")}
	}
	d := r.Delay()
	if d == 0 {
		return nil
	}
	if d > g.cfg.MaxTokenWait {
		r.Cancel()
		return &SendError{Provider: g.Name(), Class: Throttled, Err: fmt.Errorf("local rate limit: next token in %v", d.Round(time.Millisecond))}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		r.Cancel()
		return &SendError{Provider: g.Name(), Class: Transient, Err: ctx.Err()}
	}
}

// slowDown halves the local rate after the provider throttled us; with no configured
// rate it holds the provider back for a second instead.
func (g *Guard) slowDown() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.lastSlowed = time.Now()
	if g.lim.Limit() == rate.Inf {
		g.heldUntil = time.Now().Add(time.Second)
		return
	}
	g.lim.SetLimit(max(g.lim.Limit()/2, 0.5))
}

// recover raises the rate back toward the quota by a quarter every 10s without throttling.
func (g *Guard) recover() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if l := g.lim.Limit(); l < g.targetLimit && time.Since(g.lastSlowed) > 10*time.Second {
		g.lim.SetLimit(min(l*1.25, g.targetLimit))
		g.lastSlowed = time.Now()
	}
}

func (g *Guard) hold(d time.Duration) {
	g.mu.Lock()
	g.heldUntil = time.Now().Add(d)
	g.mu.Unlock()
}

func (g *Guard) held() time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	if time.Now().Before(g.heldUntil) {
		return g.heldUntil
	}
	return time.Time{}
}
