package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback"
	"go.opentelemetry.io/otel/trace"
)

// outcome is what became of a job: what it reports and how its delivery is settled. It is
// not the delivery row's status (store.go), though a final outcome completes the row.
type outcome int

const (
	outcomeHeld      outcome = iota + 1 // another dispatcher holds the lease: look again later
	outcomeSent                         // mailed, or taken as mailed: otp.delivered
	outcomeFailed                       // refused for good, or deliveries exhausted: otp.delivery_failed
	outcomeExpired                      // the code expired before it could be mailed: otp.dispatch_expired
	outcomeRetry                        // every provider failed for now: redeliver with backoff
	outcomeAmbiguous                    // no final answer: one deliberate re-send later
)

// String is the outcome's name in metrics and termination reasons.
func (o outcome) String() string {
	switch o {
	case outcomeSent:
		return "sent"
	case outcomeFailed:
		return "failed"
	case outcomeExpired:
		return "expired"
	case outcomeRetry:
		return "retry"
	case outcomeAmbiguous:
		return "ambiguous"
	case outcomeHeld:
		return "held"
	}
	return "unknown"
}

// status is the row status a final outcome completes the row with; "" for the others.
func (o outcome) status() string {
	switch o {
	case outcomeSent:
		return statusSent
	case outcomeFailed:
		return statusFailed
	case outcomeExpired:
		return statusExpired
	}
	return ""
}

// result is what a job came to, with what its event reports.
type result struct {
	outcome     outcome
	reason      string
	provider    string
	providerMsg string
	unconfirmed bool // sent on an answer the provider never confirmed
	exhausted   bool // failed because transient failures used up the deliveries
	holdFor     time.Duration
	calls       []events.ProviderAttempt
}

// replay is the result of a job whose row was settled before: reported again, not sent.
func replay(r deliveryRow) result {
	res := result{outcome: outcomeFailed}
	switch r.status {
	case statusSent:
		res.outcome = outcomeSent
	case statusExpired:
		return result{outcome: outcomeExpired}
	}
	res.provider, res.providerMsg, res.unconfirmed, res.reason = r.provider, r.providerMsg, !r.confirmed, r.lastError
	return res
}

// send mails one job's code through the chain. The consumer keeps the job in progress, so
// a slow provider never causes a redelivery.
func (s *Service) send(ctx context.Context, j *job) result {
	// The whole chain finishes well inside the lease, so no other dispatcher can take
	// the job while this one may still send it, and before the code's expiry less the
	// margin, so no mail is handed over after its code expired.
	ctx, cancel := context.WithDeadline(trace.ContextWithSpan(ctx, j.span), j.sendBy)
	defer cancel()

	dj := j.job
	p := s.cfg.Policies.For(dj.Tenant)
	locale, from := dj.Locale, s.cfg.From
	if locale == "" {
		locale = p.Locale
	}
	if p.Sender != "" {
		from = p.Sender
	}
	minutes := int(dj.ExpiresAt.Sub(dj.IssuedAt).Round(time.Minute) / time.Minute)
	subject, text, html, err := s.tmpl.Render(dj.Tenant, locale, TemplateData{Code: dj.Code, Minutes: max(minutes, 1), Purpose: dj.Purpose, Tenant: dj.Tenant})
	if err != nil {
		return result{outcome: outcomeFailed, reason: "render: " + err.Error()}
	}
	m := &mailer.Message{
		From: from, To: dj.Recipient, Subject: subject, Text: text, HTML: html,
		ID:      fmt.Sprintf("%s:%d", dj.ChallengeID, dj.CodeSeq),
		Headers: map[string]string{"X-Otp-Challenge-Id": dj.ChallengeID, "X-Otp-Tenant": dj.Tenant},
		// The tags SES reports back with every event notification of the mail
		// (sesfeedback): they tie a bounce or a complaint to its code.
		Tags: map[string]string{sesfeedback.TagTenant: dj.Tenant, "purpose": dj.Purpose, sesfeedback.TagChallenge: dj.ChallengeID,
			sesfeedback.TagCodeSeq: strconv.Itoa(dj.CodeSeq)},
	}
	s.recipientTags(dj.Tenant, dj.ChallengeID, dj.CodeSeq, dj.Recipient, m.Tags)
	ctx, calls := withCallLog(ctx)
	sent, err := s.chain.Send(ctx, m)
	res := result{calls: calls.list()}
	if err == nil {
		res.outcome, res.provider, res.providerMsg = outcomeSent, sent.Provider, sent.Receipt.MessageID
		// The chain starts with its first provider and stops at the first acceptance.
		if first := s.chain.Providers[0].Name(); first != sent.Provider {
			s.fallbacks.WithLabelValues(first, sent.Provider).Inc()
		}
		return res
	}
	res.reason = err.Error()
	var se *mailer.SendError
	if errors.As(err, &se) {
		res.provider = se.Provider
	}
	switch mailer.ClassOf(err) {
	case mailer.Permanent:
		res.outcome = outcomeFailed
	case mailer.Ambiguous:
		s.ambiguous.Inc()
		if j.row.ambiguous >= 1 {
			// This was the one re-send, and again no answer: count it as sent rather
			// than mail the code a third time.
			res.outcome, res.unconfirmed = outcomeSent, true
			return res
		}
		res.outcome = outcomeAmbiguous
		s.log.Warn("send outcome unknown; one re-send follows", "challenge_id", dj.ChallengeID, "code_seq", dj.CodeSeq, "provider", res.provider)
	default:
		res.outcome = outcomeRetry
		s.log.Warn("every provider failed; will retry", "challenge_id", dj.ChallengeID, "code_seq", dj.CodeSeq,
			"delivery", j.d.Meta().NumDelivered, "err", err)
	}
	return res
}
