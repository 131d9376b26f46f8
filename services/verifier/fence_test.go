package verifier

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestFloorWatchReadsOnceForAllWaiters: verifies waiting in the fence share one reader of
// the projection's floor: never two reads at once, every waiter answered once the floor
// passes its sequence, the reader gone once nobody waits, a floor already read answers at
// once, and a wait that runs out says why the floor could not be read.
func TestFloorWatchReadsOnceForAllWaiters(t *testing.T) {
	var floor atomic.Uint64
	var inFlight, most, reads atomic.Int64
	var failing atomic.Bool
	w := newFloorWatch(func(context.Context) (uint64, error) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		reads.Add(1)
		time.Sleep(time.Millisecond)
		if failing.Load() {
			return 0, errors.New("consumer info: no responders")
		}
		return floor.Load(), nil
	})

	var wg sync.WaitGroup
	errs := make([]error, 50)
	for i := range errs {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			errs[i] = w.wait(ctx, uint64(10+i%5))
		})
	}
	testenv.Eventually(t, 10*time.Second, "the waiters to wait", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.waiters == len(errs)
	})
	floor.Store(14)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("waiter %d: %v", i, err)
		}
	}
	if m := most.Load(); m != 1 {
		t.Errorf("%d reads of the floor ran at once, want 1", m)
	}
	testenv.Eventually(t, 10*time.Second, "the reader to stop", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return !w.polling
	})

	before := reads.Load()
	if err := w.wait(context.Background(), 12); err != nil || reads.Load() != before {
		t.Errorf("a wait below the floor read: %v, %d reads", err, reads.Load()-before)
	}

	failing.Store(true)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := w.wait(ctx, 20)
	if !errors.Is(err, context.DeadlineExceeded) || err == nil || !strings.Contains(err.Error(), "no responders") {
		t.Errorf("a wait while the floor cannot be read: %v", err)
	}
}

// TestIndexReadsPastTheFloorWithinItsBound: the index reads a tenant's supersessions
// from a real stream past the floor, skips what the projection would refuse, stops at
// its bound with an error while still answering what it holds, and reads on from where
// it stopped once the floor has moved.
func TestIndexReadsPastTheFloorWithinItsBound(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	ctx := t.Context()
	st, err := js.Stream(ctx, events.StreamChallenges)
	testenv.Must(t, err, "stream")
	publish := func(request, challenge string, body []byte) uint64 {
		t.Helper()
		if body == nil {
			m, err := events.NewMsg(events.TypeChallengeSuperseded, "acme", "challenge_superseded:"+challenge, challenge,
				events.Superseded{ChallengeID: challenge, Tenant: "acme", RequestID: request, SupersededBy: "later", SupersededAt: time.Now().UTC()},
				events.Envelope{Source: "test"})
			testenv.Must(t, err, "msg")
			body = m.Data
		}
		ack, err := js.Publish(ctx, events.TypeChallengeSuperseded.Subject("acme"), body)
		testenv.Must(t, err, "publish")
		return ack.Sequence
	}
	first := publish("r1", ch(1), nil)
	publish("bad", "", []byte(`{"tenant":"acme"}`)) // refused by the projection: closes nothing
	publish("r2", ch(2), nil)
	publish("r3", ch(3), nil)

	s := &Service{challenges: st, floor: newFloorWatch(func(context.Context) (uint64, error) { return 0, nil }),
		index: supersessionIndex{tenants: map[string]*tenantSupersessions{}, most: 2}}
	all := []string{"r1", "r2", "r3", "bad"}
	sup, err := s.supersessions(ctx, "acme", all, first-1)
	if err == nil || !sup.closes("r1", ch(1)) || !sup.closes("r2", ch(2)) || sup.closes("r3", ch(3)) || len(sup["bad"]) != 0 {
		t.Fatalf("at the bound of 2: %v, %v; want r1 and r2 held and an error", sup, err)
	}
	// The projection has applied r1: the index lets it go and reads r3.
	sup, err = s.supersessions(ctx, "acme", all, first)
	if err != nil || sup.closes("r1", ch(1)) || !sup.closes("r2", ch(2)) || !sup.closes("r3", ch(3)) {
		t.Fatalf("once the floor passed r1: %v, %v; want r2 and r3", sup, err)
	}
}

// TestAFloorOnceReadAnswersWaitsWhateverFollows: a floor read stays true, so a wait at
// or below it returns at once, also while the floor cannot be read.
func TestAFloorOnceReadAnswersWaitsWhateverFollows(t *testing.T) {
	var failing atomic.Bool
	w := newFloorWatch(func(context.Context) (uint64, error) {
		if failing.Load() {
			return 0, errors.New("consumer info: no responders")
		}
		return 10, nil
	})
	_, err := w.recent(t.Context(), 0)
	testenv.Must(t, err, "first read")
	failing.Store(true)
	if floor, err := w.recent(t.Context(), 0); err != nil || floor != 10 {
		t.Errorf("a failed read after a good one: %d, %v; want the last floor read", floor, err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := w.wait(ctx, 10); err != nil {
		t.Errorf("a wait at the floor while it cannot be read: %v", err)
	}
}
