package verifier

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
