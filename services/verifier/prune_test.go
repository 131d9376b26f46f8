package verifier

import (
	"maps"
	"slices"
	"testing"
	"time"
)

// TestIndexPrunesInStreamOrder: the index lets go of what the projection has applied
// and of what is too old to close a live code, front first, and keeps the lookup by
// request in step with the queue, also for a supersession the stream holds twice (a
// relay after the duplicate window).
func TestIndexPrunesInStreamOrder(t *testing.T) {
	now := time.Now()
	ts := &tenantSupersessions{byRequest: map[string][]string{}}
	add := func(request, challenge string, seq uint64, at time.Time) {
		ts.ahead = append(ts.ahead, aheadSupersession{requestID: request, challengeID: challenge, seq: seq, readAt: at})
		ts.byRequest[request] = append(ts.byRequest[request], challenge)
	}
	add("r1", "c1", 10, now.Add(-2*time.Hour))
	add("r2", "c2", 20, now)
	add("r1", "c1", 30, now) // the same supersession again
	add("r3", "c3", 40, now)

	ts.prune(5, now.Add(-time.Hour)) // too old: the first
	if got := ts.of([]string{"r1", "r2", "r3"}); !got.closes("r1", "c1") || !got.closes("r2", "c2") || !got.closes("r3", "c3") || len(ts.ahead) != 3 {
		t.Fatalf("after the old one went: %v, %d held", got, len(ts.ahead))
	}
	ts.prune(30, now.Add(-time.Hour)) // applied: up to 30
	got := ts.of([]string{"r1", "r2", "r3"})
	if got.closes("r1", "c1") || got.closes("r2", "c2") || !got.closes("r3", "c3") || len(ts.ahead) != 1 {
		t.Fatalf("after the floor passed 30: %v, %d held", got, len(ts.ahead))
	}
	if keys := slices.Collect(maps.Keys(ts.byRequest)); len(keys) != 1 || keys[0] != "r3" {
		t.Fatalf("the lookup holds %v, want r3 only", keys)
	}
	if ts.of([]string{"r9"}) != nil {
		t.Fatal("a request the index does not hold is closed")
	}
}
