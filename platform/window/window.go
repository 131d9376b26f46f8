// Package window is the sliding window of event times behind the "n events within d"
// limits: the issuer's rate limits and the verifier's cap on failed verifications. It is
// pure: callers load and store the stamps themselves. (The auditor's alert rules count in
// SQL, over rows of its schema that its replicas share: services/auditor/alerts.go.)
package window

import (
	"slices"
	"time"
)

// Stamps are event times in the order they were added, which callers keep in time order
// (oldest first). A Stamps value works like a slice: Add and Trim return the new window and
// may share the old one's storage.
type Stamps []time.Time

// Add returns the window with t appended as its newest stamp.
func (s Stamps) Add(t time.Time) Stamps { return append(s, t) }

// Trim returns the window without the stamps at or before cutoff: those that no longer
// count once the window starts after cutoff. It drops from the oldest end and stops at
// the first stamp after cutoff.
func (s Stamps) Trim(cutoff time.Time) Stamps {
	i := 0
	for i < len(s) && !s[i].After(cutoff) {
		i++
	}
	return s[i:]
}

// Count returns how many stamps are after t, wherever they sit in the window.
func (s Stamps) Count(t time.Time) int {
	n := 0
	for _, at := range s {
		if at.After(t) {
			n++
		}
	}
	return n
}

// KthNewest returns the k-th newest stamp (1 is the newest), or the zero time when the
// window holds fewer than k. A limit of k events per d is free again at KthNewest(k)+d.
func (s Stamps) KthNewest(k int) time.Time {
	if k < 1 || k > len(s) {
		return time.Time{}
	}
	return s[len(s)-k]
}

// Merge is one window read from two copies of it (the rows of one state kept under two
// keys during a key rotation): each copy holds every stamp or some of them, so a time
// counts as often as the copy that holds it most, never the sum. The result is in time
// order.
func Merge(a, b Stamps) Stamps {
	a, b = sorted(a), sorted(b)
	out := make(Stamps, 0, max(len(a), len(b)))
	for len(a) > 0 || len(b) > 0 {
		var t time.Time
		switch {
		case len(b) == 0 || (len(a) > 0 && a[0].Before(b[0])):
			t = a[0]
		default:
			t = b[0]
		}
		na, nb := 0, 0
		for na < len(a) && a[na].Equal(t) {
			na++
		}
		for nb < len(b) && b[nb].Equal(t) {
			nb++
		}
		for range max(na, nb) {
			out = append(out, t)
		}
		a, b = a[na:], b[nb:]
	}
	return out
}

func sorted(s Stamps) Stamps {
	s = append(Stamps(nil), s...)
	slices.SortFunc(s, func(x, y time.Time) int { return x.Compare(y) })
	return s
}
