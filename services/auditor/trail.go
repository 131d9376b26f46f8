package auditor

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
)

// Step is one event in the timeline of a request.
type Step struct {
	Time        time.Time      `json:"time"`
	Type        string         `json:"type"`
	RequestID   string         `json:"request_id"`
	ChallengeID string         `json:"challenge_id,omitempty"`
	Recipient   string         `json:"recipient,omitempty"` // masked
	Summary     string         `json:"summary"`
	Event       map[string]any `json:"event"`
	StreamSeq   int64          `json:"stream_seq"`
}

// Trail returns the timeline of one request, or of every request of one recipient
// (found by its subject hash under every key of the ring, so rows written before a key
// rotation are found), across services: requested, issued, delivered (by which provider,
// after which calls), failed, verified, locked, and what the provider reported about the
// mail afterwards (otp.feedback: delivered to the mailbox, bounced, complained of). A
// feedback names no request, only its challenge: it is found by the challenge ids of the
// request's rows and shown under the request. Steps come in the log's order (stream
// order), in which a feedback follows the delivery it is about.
func Trail(ctx context.Context, pool *pgxpool.Pool, subjects *keys.Subjects, tenant, requestID, recipient string) ([]Step, error) {
	ids := []string{requestID}
	if recipient != "" {
		// Rows that name no request (a feedback carries the recipient's hash too) do not
		// make one: request id "" would bring every such row of the tenant, other people's
		// and the tenant's alerts.
		rows, err := pool.Query(ctx, `SELECT DISTINCT request_id FROM audit.events WHERE tenant = $1 AND recipient_hash = ANY($2)
			AND request_id <> ''`, tenant, SubjectHashes(subjects, tenant, recipient))
		if err != nil {
			return nil, err
		}
		if ids, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return nil, err
		}
	}
	rows, err := pool.Query(ctx, `WITH req AS (
			SELECT stream_seq, occurred_at, type, request_id, challenge_id, recipient_masked, payload
			FROM audit.events WHERE tenant = $1 AND request_id = ANY($2) AND request_id <> ''
		), challenges AS (
			SELECT challenge_id, min(request_id) AS request_id FROM req WHERE challenge_id <> '' GROUP BY challenge_id
		)
		SELECT * FROM req
		UNION ALL
		SELECT e.stream_seq, e.occurred_at, e.type, c.request_id, e.challenge_id, e.recipient_masked, e.payload
		FROM challenges c JOIN audit.events e ON e.tenant = $1 AND e.challenge_id = c.challenge_id AND e.challenge_id <> ''
			AND e.request_id = ''
		ORDER BY stream_seq`, tenant, ids)
	if err != nil {
		return nil, err
	}
	var steps []Step
	// The codes whose otp.delivered was unconfirmed (the provider took the mail but gave
	// no final answer), until the provider reports the mail reached the mailbox.
	unconfirmed := map[string]bool{}
	for rows.Next() {
		var s Step
		var payload []byte
		if err := rows.Scan(&s.StreamSeq, &s.Time, &s.Type, &s.RequestID, &s.ChallengeID, &s.Recipient, &payload); err != nil {
			return nil, err
		}
		_ = json.Unmarshal(payload, &s.Event)
		ev, _ := events.DecodeEventOf(events.Type(s.Type), payload)
		if is, ok := ev.(events.Issued); ok && !is.RequestedAt.IsZero() {
			steps = append(steps, Step{Time: is.RequestedAt, Type: "otp.requested", RequestID: s.RequestID, Recipient: s.Recipient,
				Summary: "requested by the app", StreamSeq: s.StreamSeq})
		}
		s.Summary = summarize(s.Type, ev)
		switch e := ev.(type) {
		case events.Delivered:
			if e.Unconfirmed {
				unconfirmed[fmt.Sprintf("%s:%d", e.ChallengeID, e.CodeSeq)] = true
			}
		case events.Feedback:
			if k := fmt.Sprintf("%s:%d", e.ChallengeID, e.CodeSeq); e.Kind == events.FeedbackMailboxDelivered && unconfirmed[k] {
				s.Summary += "; confirms the send that otp.delivered left unconfirmed"
				delete(unconfirmed, k)
			}
		}
		steps = append(steps, s)
	}
	return steps, rows.Err()
}

// summarize says in one line what an event (decoded by events.DecodeEventOf) means for
// its request; an event of a type it does not know is named by its type.
func summarize(typ string, ev any) string {
	switch e := ev.(type) {
	case events.Issued:
		s := fmt.Sprintf("code %d issued, %d attempts, expires %s", e.CodeSeq, e.MaxAttempts, timestamp(e.ExpiresAt))
		if e.Test {
			s += ", test recipient"
		}
		if len(e.Risk) > 0 {
			s += fmt.Sprintf(", risk %v", e.Risk)
		}
		return s
	case events.Delivered:
		s := fmt.Sprintf("code %d delivered via %s on delivery %d%s", e.CodeSeq, e.Provider, e.Attempts, calls(e.ProviderAttempts))
		if e.Unconfirmed {
			s += ", unconfirmed"
		}
		return s
	case events.DeliveryFailed:
		return fmt.Sprintf("code %d not delivered (%s, permanent %v)%s", e.CodeSeq, e.Reason, e.Permanent, calls(e.ProviderAttempts))
	case events.DispatchExpired:
		return fmt.Sprintf("code %d expired before it could be mailed", e.CodeSeq)
	case events.VerifyFailed:
		s := fmt.Sprintf("verify failed: %s, %d attempts left", e.Status, e.AttemptsRemaining)
		if e.Reason != "" {
			s += " (" + e.Reason + ")"
		}
		return s
	case events.Verified:
		return fmt.Sprintf("verified with code %d after %d attempts", e.CodeSeq, e.Attempts)
	case events.Locked:
		return fmt.Sprintf("locked after %d attempts", e.Attempts)
	case events.Superseded:
		return "superseded by request " + e.SupersededBy
	case events.Rejected:
		return fmt.Sprintf("rejected: %s %s", e.Reason, e.Detail)
	case events.ErasureRequested:
		return fmt.Sprintf("operator %s@%s asked to erase a person (%d requests and %d dead letters deleted from the streams)",
			e.Identity.User, e.Identity.Host, e.DeletedRequests, e.DeletedDeadLetters)
	case events.Erased:
		return fmt.Sprintf("%s erased %d rows of erasure %s", e.Service, e.Rows, e.ErasureID)
	case events.Feedback:
		return feedbackSummary(e)
	case events.OperatorAction:
		who := e.Identity.User + "@" + e.Identity.Host
		if e.Identity.NATSUser != "" {
			who += " (NATS user " + e.Identity.NATSUser + ")"
		}
		s := fmt.Sprintf("operator %s ran %s", who, e.Action)
		if e.Detail != "" {
			s += ": " + e.Detail
		}
		return s
	}
	return typ
}

// feedbackSummary says what a provider reported about a code's mail: "code 1 bounced
// (Permanent/General) per ses message 0100…: 550 5.1.1 <address>: user unknown". The
// diagnostic comes with every address and IP redacted (events.Feedback); it is redacted
// again here all the same, since this line is printed for people.
func feedbackSummary(e events.Feedback) string {
	var s string
	switch e.Kind {
	case events.FeedbackMailboxDelivered:
		s = fmt.Sprintf("code %d reached the recipient's mail server", e.CodeSeq)
	case events.FeedbackBounced:
		s = fmt.Sprintf("code %d bounced", e.CodeSeq)
		if t := joinNonEmpty("/", e.BounceType, e.BounceSubType); t != "" {
			s += " (" + t + ")"
		}
	case events.FeedbackComplained:
		s = fmt.Sprintf("code %d marked as spam", e.CodeSeq)
		if e.ComplaintType != "" {
			s += " (" + e.ComplaintType + ")"
		}
	case events.FeedbackRejected:
		s = fmt.Sprintf("code %d rejected by the provider after it took it", e.CodeSeq)
	case events.FeedbackDelayed:
		s = fmt.Sprintf("code %d delayed", e.CodeSeq)
		if e.DelayType != "" {
			s += " (" + e.DelayType + ")"
		}
	default:
		s = fmt.Sprintf("code %d: provider feedback %s", e.CodeSeq, events.Reason(string(e.Kind), 64))
	}
	if e.Provider != "" || e.ProviderMessageID != "" {
		s += " per " + joinNonEmpty(" message ", e.Provider, e.ProviderMessageID)
	}
	if e.Diagnostic != "" {
		s += ": " + events.RedactIPs(events.RedactAddresses(e.Diagnostic))
	}
	return s
}

// joinNonEmpty joins the parts that are not empty.
func joinNonEmpty(sep string, parts ...string) string {
	var out []string
	for _, p := range parts {
		if p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(out, sep)
}

// calls lists a delivery's provider calls: " (ses transient → smtp ok)".
func calls(attempts []events.ProviderAttempt) string {
	if len(attempts) == 0 {
		return ""
	}
	parts := make([]string, len(attempts))
	for i, a := range attempts {
		parts[i] = a.Provider + " " + a.Outcome
	}
	return " (" + strings.Join(parts, " → ") + ")"
}

// timestamp writes t as the event carried it; empty when it carried none.
func timestamp(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.Format(time.RFC3339Nano)
}
