package auditor

import (
	"strings"

	"github.com/otpflow/otpflow/events"
	"github.com/prometheus/client_golang/prometheus"
)

// reputation counts what the sender's reputation is made of, per tenant and provider:
// the mails sent (otp.delivered) and what the provider reported about them afterwards
// (otp.feedback). An event is counted once, by the auditor that writes its row, so the
// sum over the auditors is the log's. The bounce_rate and complaint_rate alert rules judge
// the same events (alerts.go); deploy/prometheus/alerts.yaml judges these counters.
type reputation struct {
	sent     *prometheus.CounterVec
	feedback *prometheus.CounterVec
}

func newReputation(reg prometheus.Registerer) *reputation {
	m := &reputation{
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_auditor_mails_sent_total",
			Help: "Mails a provider accepted (otp.delivered written to the audit log), by tenant and provider.",
		}, []string{"tenant", "provider"}),
		feedback: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "otpflow_auditor_feedback_total",
			Help: "What a provider reported about a mail after it accepted it (otp.feedback written to the audit log), by tenant, provider, kind and, for a bounce, its type (permanent, transient, undetermined); a permanent bounce of an address on the account's suppression list is suppressed.",
		}, []string{"tenant", "provider", "kind", "bounce_type"}),
	}
	if reg != nil {
		reg.MustRegister(m.sent, m.feedback)
	}
	return m
}

// wrote counts the rows just committed, each written for the first time.
func (m *reputation) wrote(rows []*Row) {
	for _, r := range rows {
		switch e := r.Event.(type) {
		case events.Delivered:
			m.sent.WithLabelValues(r.Tenant, e.Provider).Inc()
		case events.Feedback:
			m.feedback.WithLabelValues(r.Tenant, e.Provider, feedbackKind(e.Kind), bounceType(e)).Inc()
		}
	}
}

// feedbackKind is a kind of the contract, or "other": the label's values stay few
// whatever a later release sends.
func feedbackKind(k events.FeedbackKind) string {
	switch k {
	case events.FeedbackMailboxDelivered, events.FeedbackBounced, events.FeedbackComplained,
		events.FeedbackRejected, events.FeedbackDelayed:
		return string(k)
	}
	return "other"
}

// bounceType is the label of a bounce's type: permanent (what the bounce_rate rule
// counts), transient, undetermined, suppressed (permanent, but SES did not send the mail:
// the address is on the account's suppression list) or other; empty for feedback that is
// not a bounce.
func bounceType(f events.Feedback) string {
	if f.Kind != events.FeedbackBounced {
		return ""
	}
	if reputationRule(f) == RuleBounceRate {
		return "permanent"
	}
	switch {
	case strings.EqualFold(f.BounceType, bouncePermanent):
		return "suppressed"
	case strings.EqualFold(f.BounceType, "Transient"):
		return "transient"
	case strings.EqualFold(f.BounceType, "Undetermined"), f.BounceType == "":
		return "undetermined"
	}
	return "other"
}
