package verifier

import (
	"bytes"
	"crypto/sha256"
	"math"
	"slices"
	"time"
)

// limitWindow is the window of the verify limits.
const limitWindow = time.Minute

// limit is one verify limit that applies to a call: its name (the reply's reason), its
// key in verifier.verify_limits and its cap per window.
type limit struct {
	name string
	key  []byte
	max  int
}

// limits are the verify limits that apply to a call for tenant from ip ("" if unknown).
// A client is named by its subject hash (keys.Subjects.Client: the tenant's HMAC of its
// network), so the table never holds a client IP, and a key cannot be turned back into
// one by trying the whole address space. The IP limit applies under the client's hash
// for every key of the ring: each call counts under each, and the fullest count decides,
// so a key rotation does not reset it.
func (s *Service) limits(tenant, ip string) ([]limit, error) {
	var ls []limit
	if n := s.cfg.VerifyTenantPerMinute; n > 0 {
		ls = append(ls, limit{name: "tenant_per_minute", key: limitKey("tenant|" + tenant), max: n})
	}
	if n := s.cfg.VerifyIPPerMinute; n > 0 && ip != "" {
		for _, h := range s.cfg.Subjects.ClientHashes(tenant, ip) {
			ls = append(ls, limit{name: "ip_per_minute", key: limitKey("ip|" + tenant + "|" + h), max: n})
		}
	}
	// One order for every caller: two calls never wait on each other's rows crosswise.
	slices.SortFunc(ls, func(a, b limit) int { return bytes.Compare(a.key, b.key) })
	return ls, nil
}

// limitKey is the fixed-size row key of a limit named by text that holds no plaintext.
func limitKey(name string) []byte {
	k := sha256.Sum256([]byte("otpflow/verify-limit/v2\x00" + name))
	return k[:]
}

// judgeLimits decides one call on its counts (store.countLimits; one per limit that
// applies) and returns the longest wait among the limits it exceeds: 0 means the call
// may proceed. The count is a sliding window estimated from two fixed windows, on the
// database clock. Refused calls count too: a client that keeps hammering stays refused.
func judgeLimits(ls []limit, counts []limitCount) (retryAfter int, reason string) {
	for _, c := range counts {
		i := slices.IndexFunc(ls, func(l limit) bool { return bytes.Equal(l.key, c.key) })
		if i < 0 {
			continue
		}
		if wait := slidingWait(ls[i].max, c.prevHits, c.hits, c.elapsed, limitWindow); wait > retryAfter {
			retryAfter, reason = wait, ls[i].name
		}
	}
	return retryAfter, reason
}

// slidingWait decides one call against a sliding-window limit of allowed calls per window,
// estimated as prev·(1 − elapsed/window) + cur, where cur counts the calls of the
// current fixed window including this one and prev those of the window before. It
// returns 0 if the call is within the limit of allowed calls, else the whole seconds (at least 1) until
// a further call would be.
func slidingWait(allowed, prev, cur int, elapsed, window time.Duration) int {
	w := window.Seconds()
	e := min(max(elapsed.Seconds(), 0), w)
	if float64(prev)*(w-e)/w+float64(cur) <= float64(allowed) {
		return 0
	}
	// The next call in this window counts as cur+1: it passes once the previous
	// window's weight has shrunk enough.
	wait := math.Inf(1)
	if cur+1 <= allowed && prev > 0 {
		if at := w * (1 - float64(allowed-cur-1)/float64(prev)); at < w {
			wait = max(at-e, 0)
		}
	}
	if math.IsInf(wait, 1) {
		// Otherwise in the next window, where this window's calls are the previous ones.
		at := 0.0
		if cur > 0 && allowed-1 < cur {
			at = w * (1 - float64(allowed-1)/float64(cur))
		}
		wait = (w - e) + at
	}
	return max(int(math.Ceil(wait)), 1)
}
