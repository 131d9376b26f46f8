package mailer_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/otpflow/otpflow/services/dispatcher/mailer"
)

// scripted is a fake provider for the logic above the Provider interface: it answers
// each call with the class the script gives (empty: accepted).
type scripted struct {
	name   string
	calls  atomic.Int32
	answer func(n int32) mailer.Class
}

func (s *scripted) Name() string { return s.name }
func (s *scripted) Send(context.Context, *mailer.Message) (mailer.Receipt, error) {
	n := s.calls.Add(1)
	if c := s.answer(n); c != "" {
		return mailer.Receipt{}, &mailer.SendError{Provider: s.name, Class: c, Err: errors.New(string(c))}
	}
	return mailer.Receipt{MessageID: "id"}, nil
}

func always(c mailer.Class) func(int32) mailer.Class { return func(int32) mailer.Class { return c } }

var msg = &mailer.Message{To: "a@b.co"}

func TestGuardRetriesTransientWithinBudget(t *testing.T) {
	p := &scripted{name: "p", answer: func(n int32) mailer.Class {
		if n < 3 {
			return mailer.Transient
		}
		return ""
	}}
	g := mailer.NewGuard(p, mailer.GuardConfig{RetryInitial: 10 * time.Millisecond})
	if _, err := g.Send(context.Background(), msg); err != nil || p.calls.Load() != 3 {
		t.Fatalf("err %v after %d calls, want success on the third", err, p.calls.Load())
	}

	dead := &scripted{name: "dead", answer: always(mailer.Transient)}
	g = mailer.NewGuard(dead, mailer.GuardConfig{RetryInitial: 10 * time.Millisecond, RetryBudget: 300 * time.Millisecond})
	start := time.Now()
	_, err := g.Send(context.Background(), msg)
	if mailer.ClassOf(err) != mailer.Transient || dead.calls.Load() != 3 {
		t.Fatalf("err %v after %d calls, want transient after 3", err, dead.calls.Load())
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("retries took %v, past the 300ms budget", took)
	}
}

func TestGuardDoesNotRetryWhatRetryCannotFix(t *testing.T) {
	for _, c := range []mailer.Class{mailer.Permanent, mailer.Ambiguous, mailer.ProviderDown, mailer.Throttled, mailer.QuotaExhausted} {
		p := &scripted{name: "p", answer: always(c)}
		g := mailer.NewGuard(p, mailer.GuardConfig{RetryInitial: time.Millisecond})
		if _, err := g.Send(context.Background(), msg); mailer.ClassOf(err) != c || p.calls.Load() != 1 {
			t.Errorf("%s: err %v after %d calls, want one call", c, err, p.calls.Load())
		}
	}
}

func TestBreakerOpensAndHeals(t *testing.T) {
	var mu sync.Mutex
	var transitions []string
	healthy := atomic.Bool{}
	p := &scripted{name: "primary", answer: func(int32) mailer.Class {
		if healthy.Load() {
			return ""
		}
		return mailer.ProviderDown
	}}
	g := mailer.NewGuard(p, mailer.GuardConfig{BreakerTimeout: 200 * time.Millisecond, OnStateChange: func(_, from, to string) {
		mu.Lock()
		transitions = append(transitions, from+">"+to)
		mu.Unlock()
	}})
	for range 5 {
		_, _ = g.Send(context.Background(), msg)
	}
	if g.State() != "open" {
		t.Fatalf("state %s after 5 failures", g.State())
	}
	before := p.calls.Load()
	_, err := g.Send(context.Background(), msg)
	if mailer.ClassOf(err) != mailer.ProviderDown || p.calls.Load() != before {
		t.Fatalf("an open breaker called the provider (%v)", err)
	}
	healthy.Store(true)
	time.Sleep(250 * time.Millisecond)
	for range 2 {
		if _, err := g.Send(context.Background(), msg); err != nil {
			t.Fatalf("half-open probe: %v", err)
		}
	}
	if g.State() != "closed" {
		t.Fatalf("state %s after the provider healed", g.State())
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"closed>open", "open>half-open", "half-open>closed"}; !slices.Equal(transitions, want) {
		t.Fatalf("transitions %v, want %v", transitions, want)
	}
}

func TestPermanentFailuresDoNotTripTheBreaker(t *testing.T) {
	p := &scripted{name: "p", answer: always(mailer.Permanent)}
	g := mailer.NewGuard(p, mailer.GuardConfig{})
	for range 20 {
		_, _ = g.Send(context.Background(), msg)
	}
	if g.State() != "closed" || p.calls.Load() != 20 {
		t.Fatalf("state %s, %d calls: bad recipients opened the breaker", g.State(), p.calls.Load())
	}
}

func TestThrottlingSlowsTheBucket(t *testing.T) {
	p := &scripted{name: "p", answer: func(n int32) mailer.Class {
		if n == 1 {
			return mailer.Throttled
		}
		return ""
	}}
	g := mailer.NewGuard(p, mailer.GuardConfig{Rate: 40})
	_, _ = g.Send(context.Background(), msg)
	if g.Limit() != 20 {
		t.Fatalf("limit %v after a throttle answer, want 20 (halved)", g.Limit())
	}

	// With no configured rate, a throttle answer holds the provider back briefly: the
	// next send fails over without calling it.
	p2 := &scripted{name: "p2", answer: always(mailer.Throttled)}
	g2 := mailer.NewGuard(p2, mailer.GuardConfig{})
	_, _ = g2.Send(context.Background(), msg)
	if _, err := g2.Send(context.Background(), msg); mailer.ClassOf(err) != mailer.Throttled || p2.calls.Load() != 1 {
		t.Fatalf("throttled provider called again at once (%d calls)", p2.calls.Load())
	}
}

func TestTokenBucketFailsOverInsteadOfWaiting(t *testing.T) {
	p := &scripted{name: "p", answer: always("")}
	g := mailer.NewGuard(p, mailer.GuardConfig{Rate: 5, MaxTokenWait: 50 * time.Millisecond})
	throttled := 0
	for range 10 {
		if _, err := g.Send(context.Background(), msg); mailer.ClassOf(err) == mailer.Throttled && err != nil {
			throttled++
		}
	}
	if throttled == 0 || int(p.calls.Load())+throttled != 10 {
		t.Fatalf("%d throttled locally, %d sent: the bucket did not hold 5/s", throttled, p.calls.Load())
	}
}

func TestQuotaExhaustedHoldsTheProvider(t *testing.T) {
	p := &scripted{name: "p", answer: always(mailer.QuotaExhausted)}
	g := mailer.NewGuard(p, mailer.GuardConfig{})
	_, _ = g.Send(context.Background(), msg)
	if _, err := g.Send(context.Background(), msg); err == nil || p.calls.Load() != 1 {
		t.Fatalf("a provider out of quota was called again (%d calls)", p.calls.Load())
	}
}

func TestChainFailover(t *testing.T) {
	for _, tc := range []struct {
		primary   mailer.Class
		secondary bool // whether the secondary is tried
	}{
		{mailer.Transient, true}, {mailer.Throttled, true}, {mailer.QuotaExhausted, true}, {mailer.ProviderDown, true},
		{mailer.Permanent, false}, {mailer.Ambiguous, false},
	} {
		p1 := &scripted{name: "p1", answer: always(tc.primary)}
		p2 := &scripted{name: "p2", answer: always("")}
		res, err := (&mailer.Chain{Providers: []mailer.Provider{p1, p2}}).Send(context.Background(), msg)
		if tried := p2.calls.Load() == 1; tried != tc.secondary {
			t.Errorf("%s on the primary: secondary tried = %v", tc.primary, tried)
		}
		if tc.secondary && (err != nil || res.Provider != "p2" || p1.calls.Load() != 1) {
			t.Errorf("%s: %+v %v", tc.primary, res, err)
		}
		if !tc.secondary && mailer.ClassOf(err) != tc.primary {
			t.Errorf("%s: err %v", tc.primary, err)
		}
	}
}
