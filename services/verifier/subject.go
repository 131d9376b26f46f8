package verifier

import (
	"slices"
	"time"

	"github.com/otpflow/otpflow/platform/window"
)

// A recipient is known to the verifier only by its subject hashes (keys.Subjects,
// OTP_SUBJECT_KEY), one per key of the ring when its challenge was projected. The
// failure cap reads the rows under every hash, decides on their merge, and writes the
// whole state back under every hash, so it holds across a key rotation, also while
// verifiers with the old ring and with the new one run side by side.

// mergeStamps merges the stamps of one state read under two hashes. Rows agree, or one
// holds more (a verifier that knew fewer keys wrote only some): each stamp counts as
// often as in the row that holds it most often.
func mergeStamps(a, b window.Stamps) window.Stamps {
	a, b = sortedStamps(a), sortedStamps(b)
	out := make(window.Stamps, 0, max(len(a), len(b)))
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

func sortedStamps(s window.Stamps) window.Stamps {
	s = append(window.Stamps(nil), s...)
	slices.SortFunc(s, func(x, y time.Time) int { return x.Compare(y) })
	return s
}
