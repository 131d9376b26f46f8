package window

import (
	"fmt"
	"slices"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)

func at(secs ...int) Stamps {
	var s Stamps
	for _, n := range secs {
		s = s.Add(t0.Add(time.Duration(n) * time.Second))
	}
	return s
}

func TestTrim(t *testing.T) {
	tests := []struct {
		name   string
		stamps Stamps
		cutoff int
		want   Stamps
	}{
		{"empty", nil, 0, nil},
		{"all after", at(1, 2, 3), 0, at(1, 2, 3)},
		{"stamp at the cutoff goes", at(1, 2, 3), 2, at(3)},
		{"all at or before", at(1, 2), 5, nil},
		{"stops at the first stamp after", at(1, 9, 2, 3), 5, at(9, 2, 3)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.stamps.Trim(t0.Add(time.Duration(tc.cutoff) * time.Second))
			if !slices.Equal(got, tc.want) {
				t.Fatalf("Trim = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestCount(t *testing.T) {
	tests := []struct {
		name   string
		stamps Stamps
		since  int
		want   int
	}{
		{"empty", nil, 0, 0},
		{"after only", at(1, 2, 3), 1, 2},
		{"out of order stamps count too", at(5, 1, 6), 2, 2},
		{"none after", at(1, 2), 2, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.stamps.Count(t0.Add(time.Duration(tc.since) * time.Second)); got != tc.want {
				t.Fatalf("Count = %d, want %d", got, tc.want)
			}
		})
	}
}

func TestKthNewest(t *testing.T) {
	s := at(1, 2, 3)
	tests := []struct {
		name string
		k    int
		want time.Time
	}{
		{"newest", 1, t0.Add(3 * time.Second)},
		{"oldest", 3, t0.Add(time.Second)},
		{"more than held", 4, time.Time{}},
		{"zero", 0, time.Time{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := s.KthNewest(tc.k); !got.Equal(tc.want) {
				t.Fatalf("KthNewest(%d) = %v, want %v", tc.k, got, tc.want)
			}
		})
	}
}

// A limit of 2 per minute: the third event waits until the older of the last two leaves.
func Example() {
	now := t0.Add(90 * time.Second)
	w := Stamps{t0, t0.Add(40 * time.Second), t0.Add(80 * time.Second)}.Trim(now.Add(-time.Minute))
	if len(w) >= 2 {
		wait := w.KthNewest(2).Add(time.Minute).Sub(now)
		fmt.Println("next send in", wait)
	}
	// Output: next send in 10s
}

// TestMerge: two copies of one window (rows under two keys during a rotation) merge to
// the fuller one, each time counted as often as the copy that holds it most, never twice.
func TestMerge(t *testing.T) {
	s := at
	for _, tt := range []struct {
		name    string
		a, b    Stamps
		wantLen int
	}{
		{"equal copies count once", s(1, 2, 3), s(1, 2, 3), 3},
		{"one copy holds more", s(1, 2), s(1, 2, 3), 3},
		{"a batch's shared stamp", s(1, 1, 2), s(1, 2), 3},
		{"unsorted input", s(3, 1), s(2), 3},
		{"one empty", nil, s(5), 1},
	} {
		got := Merge(tt.a, tt.b)
		if len(got) != tt.wantLen {
			t.Errorf("%s: %d stamps, want %d", tt.name, len(got), tt.wantLen)
		}
		for i := 1; i < len(got); i++ {
			if got[i].Before(got[i-1]) {
				t.Errorf("%s: out of order: %v", tt.name, got)
			}
		}
	}
}
