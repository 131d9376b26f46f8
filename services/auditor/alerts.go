package auditor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/window"
	"github.com/prometheus/client_golang/prometheus"
)

// Alert rule names.
const (
	RuleVerifyFailuresRecipient = "verify_failures_recipient" // failed verifications for one recipient
	RuleVerifyFailuresTenant    = "verify_failures_tenant"    // failed verifications in one tenant
	RuleDeliveryFailureRatio    = "delivery_failure_ratio"    // share of failed calls to one provider
	RuleRequestBurstIP          = "request_burst_ip"          // codes issued for one client IP
	RuleSupersedeStorm          = "supersede_storm"           // superseded challenges in one tenant
)

// Threshold is one alert rule: Count events within Window (for the ratio rule: a share
// of at least Ratio among at least Count calls).
type Threshold struct {
	Count  int
	Window time.Duration
	Ratio  float64
}

// DefaultThresholds are the rules' defaults.
func DefaultThresholds() map[string]Threshold {
	return map[string]Threshold{
		RuleVerifyFailuresRecipient: {Count: 8, Window: 10 * time.Minute},
		RuleVerifyFailuresTenant:    {Count: 200, Window: time.Minute},
		RuleDeliveryFailureRatio:    {Count: 20, Window: 5 * time.Minute, Ratio: 0.5},
		RuleRequestBurstIP:          {Count: 30, Window: time.Minute},
		RuleSupersedeStorm:          {Count: 100, Window: time.Minute},
	}
}

// ParseThresholds reads OTP_ALERT_RULES: "rule=count/window[/ratio],...", overriding the
// defaults; a count of 0 turns a rule off.
func ParseThresholds(s string) (map[string]Threshold, error) {
	th := DefaultThresholds()
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, spec, ok := strings.Cut(part, "=")
		if _, known := th[name]; !ok || !known {
			return nil, fmt.Errorf("alert rule %q: want one of %s as rule=count/window", name, strings.Join(ruleNames(th), ", "))
		}
		fields := strings.Split(spec, "/")
		if len(fields) < 2 || len(fields) > 3 {
			return nil, fmt.Errorf("alert rule %s: want count/window[/ratio]", name)
		}
		var t Threshold
		var err error
		if t.Count, err = strconv.Atoi(fields[0]); err != nil || t.Count < 0 {
			return nil, fmt.Errorf("alert rule %s: bad count", name)
		}
		if t.Window, err = time.ParseDuration(fields[1]); err != nil || t.Window <= 0 {
			return nil, fmt.Errorf("alert rule %s: bad window", name)
		}
		if len(fields) == 3 {
			if t.Ratio, err = strconv.ParseFloat(fields[2], 64); err != nil || t.Ratio <= 0 || t.Ratio > 1 {
				return nil, fmt.Errorf("alert rule %s: bad ratio", name)
			}
		} else if name == RuleDeliveryFailureRatio {
			t.Ratio = DefaultThresholds()[name].Ratio
		}
		th[name] = t
	}
	return th, nil
}

func ruleNames(th map[string]Threshold) []string {
	var out []string
	for k := range th {
		out = append(out, k)
	}
	return out
}

// alerter watches the audited events for anomalies and raises otp.alert.<tenant>. An
// alert lands on the audit stream, which erasure cannot reach: its detail names no
// address and no IP, not even masked, and its id no unkeyed hash of one; the person or
// client network it counted is named only by subject hash (Alert.SubjectHash).
type alerter struct {
	th       map[string]Threshold
	subjects *keys.Subjects
	publish  func(context.Context, []*nats.Msg) error
	lookup   func(ctx context.Context, challengeID string) (recipient []byte)
	raised   *prometheus.CounterVec

	mu       sync.Mutex
	windows  map[string]window.Stamps // rule|key -> event times
	calls    map[string]providerCalls // provider -> recent calls
	lastSent map[string]time.Time     // rule|key -> last alert
	rcpts    map[string]rcpt          // challenge -> recipient
}

// providerCalls are the recent calls to one provider: all of them, and the failed ones.
type providerCalls struct {
	all, failed window.Stamps
}

// rcpt is the recipient of a challenge: hash keys the rule's windows (the audit log's
// recipient hash), subject names it in the alert (its subject hash, when the event told).
type rcpt struct {
	hash    string
	subject string
	at      time.Time
}

func newAlerter(th map[string]Threshold, subjects *keys.Subjects, reg prometheus.Registerer) *alerter {
	a := &alerter{th: th, subjects: subjects, windows: map[string]window.Stamps{}, calls: map[string]providerCalls{}, lastSent: map[string]time.Time{},
		rcpts: map[string]rcpt{},
		raised: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_auditor_alerts_total", Help: "Anomaly alerts raised, by rule.",
		}, []string{"rule"})}
	if reg != nil {
		reg.MustRegister(a.raised)
	}
	return a
}

// observe feeds a committed batch of rows (in stream order) to the rules.
func (a *alerter) observe(ctx context.Context, rows []*Row) {
	var out []*nats.Msg
	for _, r := range rows {
		out = append(out, a.rowAlerts(ctx, r)...)
	}
	if len(out) > 0 && a.publish != nil {
		_ = a.publish(ctx, out)
	}
}

func (a *alerter) rowAlerts(ctx context.Context, r *Row) []*nats.Msg {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []*nats.Msg
	raise := func(rule, key, tenant, detail, subject string, value float64) {
		t := a.th[rule]
		k := rule + "|" + key
		if last, ok := a.lastSent[k]; ok && r.OccurredAt.Sub(last) < t.Window {
			return // one alert per key and window
		}
		a.lastSent[k] = r.OccurredAt
		threshold := float64(t.Count)
		if rule == RuleDeliveryFailureRatio {
			threshold = t.Ratio
		}
		bucket := r.OccurredAt.Truncate(t.Window).Unix()
		sum := sha256.Sum256([]byte(key))
		id := fmt.Sprintf("alert:%s:%s:%d", rule, hex.EncodeToString(sum[:8]), bucket)
		m, err := events.NewMsg(events.TypeAlert, tenant, id, "", events.Alert{Tenant: tenant, Rule: rule, Severity: "warning",
			Detail: detail, Value: value, Threshold: threshold, RaisedAt: r.OccurredAt.UTC(), SubjectHash: subject}, events.Envelope{Source: "otpflow/auditor"})
		if err == nil {
			out = append(out, m)
			a.raised.WithLabelValues(rule).Inc()
		}
	}
	count := func(rule, key string) int {
		t := a.th[rule]
		if t.Count == 0 {
			return -1
		}
		k := rule + "|" + key
		a.windows[k] = a.windows[k].Add(r.OccurredAt).Trim(r.OccurredAt.Add(-t.Window))
		return len(a.windows[k])
	}

	switch e := r.Event.(type) {
	case events.Issued:
		if e.ChallengeID != "" && r.RecipientHash != nil {
			// The row's recipient hash is the person's subject hash (OTP_SUBJECT_KEY).
			a.rcpts[e.ChallengeID] = rcpt{hash: string(r.RecipientHash), subject: string(r.RecipientHash), at: r.OccurredAt}
		}
		if client := r.PII["client_hash"]; client != "" {
			// Counted per client network, as the issuer's limits count, by its subject
			// hash (events.ClientNetwork under OTP_SUBJECT_KEY; ToRow hashes the IP of an
			// event of an earlier release): the window's key ends up hashed in the alert's
			// id, and an unkeyed hash of an IPv4 address is undone by trying them all.
			if n := count(RuleRequestBurstIP, r.Tenant+"|"+client); n >= a.th[RuleRequestBurstIP].Count && n > 0 {
				raise(RuleRequestBurstIP, r.Tenant+"|"+client, r.Tenant, fmt.Sprintf("%d codes issued for one client network within %v", n, a.th[RuleRequestBurstIP].Window), client, float64(n))
			}
		}
	case events.VerifyFailed:
		if n := count(RuleVerifyFailuresTenant, r.Tenant); n >= a.th[RuleVerifyFailuresTenant].Count && n > 0 {
			raise(RuleVerifyFailuresTenant, r.Tenant, r.Tenant, fmt.Sprintf("%d failed verifications within %v", n, a.th[RuleVerifyFailuresTenant].Window), "", float64(n))
		}
		who, ok := a.rcpts[e.ChallengeID]
		if !ok && e.ChallengeID != "" && a.lookup != nil {
			a.mu.Unlock()
			h := a.lookup(ctx, e.ChallengeID)
			a.mu.Lock()
			if h != nil {
				// Found in the log after a restart, by its subject hash.
				who, ok = rcpt{hash: string(h), subject: string(h), at: r.OccurredAt}, true
				a.rcpts[e.ChallengeID] = who
			}
		}
		if ok {
			if n := count(RuleVerifyFailuresRecipient, r.Tenant+"|"+who.hash); n >= a.th[RuleVerifyFailuresRecipient].Count && n > 0 {
				raise(RuleVerifyFailuresRecipient, r.Tenant+"|"+who.hash, r.Tenant, fmt.Sprintf("%d failed verifications for one recipient within %v", n, a.th[RuleVerifyFailuresRecipient].Window), who.subject, float64(n))
			}
		}
	case events.Superseded:
		if n := count(RuleSupersedeStorm, r.Tenant); n >= a.th[RuleSupersedeStorm].Count && n > 0 {
			raise(RuleSupersedeStorm, r.Tenant, r.Tenant, fmt.Sprintf("%d challenges superseded within %v", n, a.th[RuleSupersedeStorm].Window), "", float64(n))
		}
	case events.Delivered:
		a.countCalls(r.OccurredAt, e.ProviderAttempts, raise)
	case events.DeliveryFailed:
		a.countCalls(r.OccurredAt, e.ProviderAttempts, raise)
	}
	// Keep the challenge map bounded.
	for id, who := range a.rcpts {
		if r.OccurredAt.Sub(who.at) > time.Hour {
			delete(a.rcpts, id)
		}
	}
	return out
}

// countCalls feeds the provider calls of one delivery to the failure-ratio rule. A call
// failed unless it succeeded or the address was refused (that says nothing of the
// provider's health).
func (a *alerter) countCalls(at time.Time, attempts []events.ProviderAttempt, raise func(rule, key, tenant, detail, subject string, value float64)) {
	t := a.th[RuleDeliveryFailureRatio]
	cutoff := at.Add(-t.Window)
	for _, c := range attempts {
		if c.Provider == "" || t.Count == 0 {
			continue
		}
		pc := a.calls[c.Provider]
		pc.all = pc.all.Add(at).Trim(cutoff)
		if c.Outcome != "ok" && c.Outcome != "permanent" {
			pc.failed = pc.failed.Add(at)
		}
		pc.failed = pc.failed.Trim(cutoff)
		a.calls[c.Provider] = pc
		n, failed := len(pc.all), len(pc.failed)
		if ratio := float64(failed) / float64(n); n >= t.Count && ratio >= t.Ratio {
			raise(RuleDeliveryFailureRatio, c.Provider, "_system", fmt.Sprintf("provider %s failed %d of %d calls within %v", c.Provider, failed, n, t.Window), "", ratio)
		}
	}
}

// lookupRecipient finds the audit hash of a challenge's recipient in the log (after a
// restart).
func (s *Service) lookupRecipient(ctx context.Context, challengeID string) []byte {
	var h []byte
	_ = s.pool.QueryRow(ctx, `SELECT recipient_hash FROM audit.events WHERE challenge_id = $1 AND recipient_hash IS NOT NULL
		ORDER BY stream_seq LIMIT 1`, challengeID).Scan(&h)
	return h
}
