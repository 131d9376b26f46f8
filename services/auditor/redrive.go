package auditor

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// A redrive of the auditor's dead letter (`otpflow dlq redrive` of an OTP_EVENTS entry of
// consumer "auditor") is an otp.operator_action "dlq.redrive" that names the event by its
// stream sequence and ce-id (events.RedriveRef), not a copy of it: a copy would be a new
// OTP_EVENTS message, audited a second time. The auditor chains the reference's own row,
// and just before it the original's row, read from the stream under the original's own
// sequence, so that the anchored verification, which asks every sequence for its row,
// finds it there. A sequence that has its row already gets none: a redrive of what was
// chained, or the same redrive redelivered, adds nothing but the operator's row.

// redriveRefused is why a reference is not followed; the reference's row is chained all
// the same (the operator asked), and the dead letter is gone, so it is logged and counted.
type redriveRefused struct{ why string }

func (e *redriveRefused) Error() string { return e.why }

// redriveOriginal returns the row of the original that r, a chained-to-be row, asks the
// auditor to chain, or nil when r is no redrive of the auditor's. It fails with a
// *redriveRefused when the reference cannot be followed (not the named event, gone from
// the stream, of another tenant, or still one the log cannot keep), and with another
// error when the stream could not be read (the batch is tried again).
func (s *Service) redriveOriginal(ctx context.Context, r *Row, data []byte) (*Row, error) {
	if r.Type != string(events.TypeOperatorAction) {
		return nil, nil
	}
	ref := events.RedriveActionOf(data)
	if ref == nil || ref.Consumer != events.ConsumerAuditor {
		return nil, nil
	}
	if ref.Stream != events.StreamEvents || ref.StreamSeq == 0 || ref.StreamSeq >= r.StreamSeq {
		return nil, &redriveRefused{fmt.Sprintf("the redrive names %s %d, not an earlier %s event", ref.Stream, ref.StreamSeq, events.StreamEvents)}
	}
	var orig *jetstream.RawStreamMsg
	_, err := platform.ScanStream(ctx, s.js, events.StreamEvents, platform.Scan{From: ref.StreamSeq}, func(m *jetstream.RawStreamMsg) error {
		orig = m
		return platform.ErrStopScan
	})
	if err != nil {
		return nil, fmt.Errorf("read %s %d for a redrive: %w", events.StreamEvents, ref.StreamSeq, err)
	}
	if orig == nil || orig.Sequence != ref.StreamSeq {
		return nil, &redriveRefused{fmt.Sprintf("%s no longer holds sequence %d", events.StreamEvents, ref.StreamSeq)}
	}
	if id := orig.Header.Get(events.HeaderID); id != ref.EventID {
		return nil, &redriveRefused{fmt.Sprintf("%s %d is not event %q", events.StreamEvents, ref.StreamSeq, ref.EventID)}
	}
	row, err := ToRow(s.cfg.RecipientKey, s.cfg.Subjects, orig.Sequence, orig.Time, orig.Subject, orig.Header, orig.Data)
	if err != nil {
		return nil, &redriveRefused{fmt.Sprintf("%s %d still cannot be kept: %v", events.StreamEvents, ref.StreamSeq, err)}
	}
	if row.Tenant != r.Tenant {
		return nil, &redriveRefused{fmt.Sprintf("%s %d is not an event of tenant %s", events.StreamEvents, ref.StreamSeq, r.Tenant)}
	}
	if err := s.eraseRedriven(ctx, &row); err != nil {
		return nil, err
	}
	return &row, nil
}

// eraseRedriven clears the personal data of row, an event chained late by a redrive, when
// an erasure of its person was chained after its place in the stream: the row is written
// as it would have been had it been chained in its turn and erased then (as a replay
// rebuilds it, Erasures). Its person is found as the erasure finds them: by the subject
// hash of the row (recipient or counted subject), or through its challenge, when a row of
// that challenge was erased. The chain digest is kept; only the erasable columns go.
func (s *Service) eraseRedriven(ctx context.Context, row *Row) error {
	if row.RecipientHash == nil && row.PII == nil {
		return nil // nothing to erase
	}
	rows, err := s.pool.Query(ctx, `SELECT stream_seq, subject, payload FROM audit.events
		WHERE tenant = $1 AND type = $2 AND stream_seq > $3 AND chain_pos IS NOT NULL ORDER BY stream_seq`,
		row.Tenant, string(events.TypeErasureRequested), int64(row.StreamSeq))
	if err != nil {
		return fmt.Errorf("erasures after %d: %w", row.StreamSeq, err)
	}
	es := NewErasures()
	var seq int64
	var subject string
	var payload []byte
	if _, err := pgx.ForEachRow(rows, []any{&seq, &subject, &payload}, func() error {
		_ = es.Add(uint64(seq), subject, payload) // a malformed request erased nobody live either
		return nil
	}); err != nil {
		return fmt.Errorf("erasures after %d: %w", row.StreamSeq, err)
	}
	if es.Len() > 0 && es.Apply(row) {
		return nil
	}
	if row.ChallengeID == "" || es.Len() == 0 {
		return nil
	}
	var erased bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM audit.events
		WHERE tenant = $1 AND challenge_id = $2 AND erased_at IS NOT NULL)`, row.Tenant, row.ChallengeID).Scan(&erased); err != nil {
		return fmt.Errorf("erased rows of challenge: %w", err)
	}
	if erased {
		row.RecipientHash, row.RecipientMasked, row.PII, row.PIISalt = nil, "", nil, nil
	}
	return nil
}

// withRedriven returns rows with the original of each redrive reference among them
// (redriveOriginal) just before the reference's row, and those originals. A refused
// reference is logged and counted; its row is chained alone.
func (s *Service) withRedriven(ctx context.Context, rows []*Row, data [][]byte) ([]*Row, map[*Row]bool, error) {
	out := make([]*Row, 0, len(rows))
	originals := map[*Row]bool{}
	for i, r := range rows {
		orig, err := s.redriveOriginal(ctx, r, data[i])
		var refused *redriveRefused
		switch {
		case errors.As(err, &refused):
			s.log.Warn("redrive not followed", "seq", r.StreamSeq, "why", refused.why)
			s.redrives.WithLabelValues("refused").Inc()
		case err != nil:
			return nil, nil, err
		case orig != nil:
			out = append(out, orig)
			originals[orig] = true
		}
		out = append(out, r)
	}
	return out, originals, nil
}
