package verifier

import (
	"encoding/json"
	"sync"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"golang.org/x/time/rate"
)

// What keeps otp.status from crowding out otp.verify, which shares its process, its
// connection and its database pool: slots of its own that a call never waits for, and a
// pace per tenant. The tenant's verify limit (OTP_VERIFY_TENANT_PER_MINUTE) is not used:
// it is counted in the database, one write per call across replicas, which is what a
// flood of status calls must not cost, and it would spend the tenant's verifies on
// status calls.

// admitStatus decides, in the status subscription's callback, whether a status call
// runs: a tenant over its pace is answered rate_limited (code 429), and with every
// status slot taken the call is answered busy (code 503), at once; neither waits, so the
// callback never stalls. An admitted call holds a slot of s.statusSlots, which its
// caller gives back.
func (s *Service) admitStatus(req micro.Request) bool {
	if _, tenant, err := events.SplitSubject(req.Subject()); err == nil && !s.statusRates.allow(tenant) {
		s.refuseStatus(req, "rate_limited", "429", "too many status requests for the tenant; retry later")
		return false
	}
	select {
	case s.statusSlots <- struct{}{}:
		return true
	default:
		s.refuseStatus(req, "busy", "503", "busy; retry")
		return false
	}
}

// refuseStatus answers a status call that is not run with StatusReply{Error: reason} as
// a micro error reply (headers Nats-Service-Error and Nats-Service-Error-Code: code).
func (s *Service) refuseStatus(req micro.Request, reason, code, description string) {
	s.statuses.WithLabelValues(reason).Inc()
	body, _ := json.Marshal(events.StatusReply{Error: reason})
	if err := req.Error(code, description, body); err != nil {
		s.log.Warn("status reply", "err", err)
	}
}

// maxPacedTenants is how many tenants' buckets tenantRates keeps before it forgets those
// that are full again (idle).
const maxPacedTenants = 1024

// tenantRates paces calls per tenant in one process: a token bucket per tenant, filled at
// perMinute a minute and holding a second's worth (at least one call).
type tenantRates struct {
	limit rate.Limit
	burst int

	mu      sync.Mutex
	tenants map[string]*rate.Limiter
}

// newTenantRates returns the pace of perMinute calls a minute per tenant; nil (every call
// allowed) when perMinute is not positive.
func newTenantRates(perMinute int) *tenantRates {
	if perMinute <= 0 {
		return nil
	}
	return &tenantRates{limit: rate.Limit(float64(perMinute) / 60), burst: max(perMinute/60, 1),
		tenants: map[string]*rate.Limiter{}}
}

// allow reports whether tenant may make a call now, and counts it if so.
func (r *tenantRates) allow(tenant string) bool {
	if r == nil {
		return true
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.tenants[tenant]
	if l == nil {
		if len(r.tenants) >= maxPacedTenants {
			// A full bucket allows what a new one would: forgetting it changes nothing.
			now := time.Now()
			for t, b := range r.tenants {
				if b.TokensAt(now) >= float64(r.burst) {
					delete(r.tenants, t)
				}
			}
		}
		l = rate.NewLimiter(r.limit, r.burst)
		r.tenants[tenant] = l
	}
	return l.Allow()
}
