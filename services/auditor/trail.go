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
// after which calls), failed, verified, locked.
func Trail(ctx context.Context, pool *pgxpool.Pool, subjects *keys.Subjects, tenant, requestID, recipient string) ([]Step, error) {
	ids := []string{requestID}
	if recipient != "" {
		rows, err := pool.Query(ctx, `SELECT DISTINCT request_id FROM audit.events WHERE tenant = $1 AND recipient_hash = ANY($2)`,
			tenant, SubjectHashes(subjects, tenant, recipient))
		if err != nil {
			return nil, err
		}
		if ids, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return nil, err
		}
	}
	rows, err := pool.Query(ctx, `SELECT stream_seq, occurred_at, type, request_id, challenge_id, recipient_masked, payload
		FROM audit.events WHERE tenant = $1 AND request_id = ANY($2) ORDER BY stream_seq`, tenant, ids)
	if err != nil {
		return nil, err
	}
	var steps []Step
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
