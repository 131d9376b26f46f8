package auditor

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
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
// (found by its keyed hash), across services: requested, issued, delivered (by which
// provider, after which calls), failed, verified, locked.
func Trail(ctx context.Context, pool *pgxpool.Pool, key []byte, tenant, requestID, recipient string) ([]Step, error) {
	ids := []string{requestID}
	if recipient != "" {
		rows, err := pool.Query(ctx, `SELECT DISTINCT request_id FROM audit.events WHERE tenant = $1 AND recipient_hash = $2`,
			tenant, RecipientHash(key, recipient))
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
		if s.Type == "otp.issued" {
			if at, ok := s.Event["requested_at"].(string); ok {
				if t, err := time.Parse(time.RFC3339Nano, at); err == nil {
					steps = append(steps, Step{Time: t, Type: "otp.requested", RequestID: s.RequestID, Recipient: s.Recipient,
						Summary: "requested by the app", StreamSeq: s.StreamSeq})
				}
			}
		}
		s.Summary = summarize(s.Type, s.Event)
		steps = append(steps, s)
	}
	return steps, rows.Err()
}

func summarize(typ string, e map[string]any) string {
	str := func(k string) string { v, _ := e[k].(string); return v }
	num := func(k string) int { v, _ := e[k].(float64); return int(v) }
	calls := func() string {
		list, _ := e["provider_attempts"].([]any)
		var parts []string
		for _, a := range list {
			m, _ := a.(map[string]any)
			parts = append(parts, fmt.Sprintf("%v %v", m["provider"], m["outcome"]))
		}
		if len(parts) == 0 {
			return ""
		}
		return " (" + strings.Join(parts, " → ") + ")"
	}
	switch typ {
	case "otp.issued":
		s := fmt.Sprintf("code %d issued, %d attempts, expires %s", num("code_seq"), num("max_attempts"), str("expires_at"))
		if e["test"] == true {
			s += ", test recipient"
		}
		if r, ok := e["risk"].([]any); ok && len(r) > 0 {
			s += fmt.Sprintf(", risk %v", r)
		}
		return s
	case "otp.delivered":
		s := fmt.Sprintf("code %d delivered via %s on delivery %d%s", num("code_seq"), str("provider"), num("attempts"), calls())
		if e["unconfirmed"] == true {
			s += ", unconfirmed"
		}
		return s
	case "otp.delivery_failed":
		return fmt.Sprintf("code %d not delivered (%s, permanent %v)%s", num("code_seq"), str("reason"), e["permanent"], calls())
	case "otp.dispatch_expired":
		return fmt.Sprintf("code %d expired before it could be mailed", num("code_seq"))
	case "otp.verify_failed":
		s := fmt.Sprintf("verify failed: %s, %d attempts left", str("status"), num("attempts_remaining"))
		if r := str("reason"); r != "" {
			s += " (" + r + ")"
		}
		return s
	case "otp.verified":
		return fmt.Sprintf("verified with code %d after %d attempts", num("code_seq"), num("attempts"))
	case "otp.locked":
		return fmt.Sprintf("locked after %d attempts", num("attempts"))
	case "otp.superseded":
		return "superseded by request " + str("superseded_by")
	case "otp.rejected":
		return fmt.Sprintf("rejected: %s %s", str("reason"), str("detail"))
	}
	return typ
}
