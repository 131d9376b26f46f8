package auditor

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// A redrive of the auditor's dead letter (`otpflow dlq redrive`, an OTP_EVENTS entry of
// consumer "auditor") reaches it as an otp.operator_action "dlq.redrive" that names the
// event by its stream sequence and ce-id (events.RedriveRef), not a copy of it: a copy
// would be a new OTP_EVENTS message, audited a second time. The auditor chains the
// reference's own row, and just before it the original's row, read from the stream under
// the original's own sequence, so that the anchored verification, which asks every
// sequence for its row, finds it there. A sequence that has its row already gets none: a
// redrive of what was chained, or the same redrive redelivered, adds nothing but the
// operator's row.
//
// The original's row is what it would have been, had it been chained in its turn and
// erased then: a person erased after the original's place in the stream (by subject
// hash, or through one of their challenges) is left out of it, as a replay leaves them
// out (Erasures). That is decided under the chain head's lock, so no erasure commits
// between the decision and the row. What the original's row cannot do: raise an alert
// (its time is past), or be an erasure request (its erasure would be done late and out
// of order: the operator runs `otpflow erase` again). A sequence a purge has cut is not
// chained again, nor one the auditor has not given up yet (above its acknowledgement
// floor: still on its way, or held behind an earlier event). A reference not followed
// for one of these reasons, or because the database refuses the original again, has its
// row chained alone, and the original goes back to OTP_DLQ with why, so that a redrive
// never loses what it took from there.

// redriven is one original a reference brings.
type redriven struct {
	row *Row                    // the original's row
	msg *jetstream.RawStreamMsg // the original
	ref *Row                    // the reference's row
	why string                  // why it goes back to OTP_DLQ, when it does
}

// redriveBatch is what a batch's redrive references bring: the originals to chain, and
// the references not followed, with why (logged and counted once the batch commits).
type redriveBatch struct {
	originals map[*Row]*redriven
	refused   map[*Row]string
	again     []*redriven // not chained after all: back to OTP_DLQ, with why
}

// redriveRefused is why a reference is not followed; its row is chained all the same
// (the operator asked). back: the original was found, and goes back to OTP_DLQ.
type redriveRefused struct {
	why  string
	back bool
}

func (e *redriveRefused) Error() string { return e.why }

// prepareRedrives finds the redrive references among rows (their bodies in data) that
// name the auditor and reads each original from the stream. A stream that cannot be
// read fails with platform.ErrUnavailable: the batch is held, not blamed.
func (s *Service) prepareRedrives(ctx context.Context, rows []*Row, data [][]byte) (*redriveBatch, error) {
	b := &redriveBatch{originals: map[*Row]*redriven{}, refused: map[*Row]string{}}
	for i, r := range rows {
		orig, err := s.redriveOriginal(ctx, r, data[i])
		var refused *redriveRefused
		switch {
		case errors.As(err, &refused) && refused.back:
			orig.why = refused.why
			b.again = append(b.again, orig)
		case errors.As(err, &refused):
			b.refused[r] = refused.why
		case err != nil:
			return nil, fmt.Errorf("%w: %w", platform.ErrUnavailable, err)
		case orig != nil:
			b.originals[orig.row] = orig
		}
	}
	return b, nil
}

// redriveOriginal returns the original that r, a row about to be chained, asks the
// auditor to chain, or nil when r is no redrive of the auditor's. It fails with a
// *redriveRefused when the reference cannot be followed, and with another error when
// the stream could not be read.
func (s *Service) redriveOriginal(ctx context.Context, r *Row, data []byte) (*redriven, error) {
	if r.Type != string(events.TypeOperatorAction) {
		return nil, nil
	}
	ref := events.RedriveActionOf(data)
	if ref == nil || ref.Consumer != events.ConsumerAuditor {
		return nil, nil
	}
	if ref.Stream != events.StreamEvents || ref.StreamSeq == 0 || ref.StreamSeq >= r.StreamSeq {
		return nil, &redriveRefused{why: fmt.Sprintf("the redrive names %s %d, not an earlier %s event", ref.Stream, ref.StreamSeq, events.StreamEvents)}
	}
	// From the leader, whose answer names the sequence and subject in fields a stored
	// message cannot forge (platform.GetMsg); and it must be the one asked for.
	orig, err := platform.GetMsg(ctx, s.js, events.StreamEvents, ref.StreamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, &redriveRefused{why: fmt.Sprintf("%s no longer holds sequence %d", events.StreamEvents, ref.StreamSeq)}
	}
	if err != nil {
		return nil, fmt.Errorf("read %s %d for a redrive: %w", events.StreamEvents, ref.StreamSeq, err)
	}
	if orig.Sequence != ref.StreamSeq {
		return nil, &redriveRefused{why: fmt.Sprintf("%s answered sequence %d for %d", events.StreamEvents, orig.Sequence, ref.StreamSeq)}
	}
	if id := orig.Header.Get(events.HeaderID); id != ref.EventID {
		return nil, &redriveRefused{why: fmt.Sprintf("%s %d is not event %q", events.StreamEvents, ref.StreamSeq, ref.EventID)}
	}
	if _, tenant, _ := events.SplitSubject(orig.Subject); tenant != r.Tenant {
		return nil, &redriveRefused{why: fmt.Sprintf("%s %d is not an event of tenant %s", events.StreamEvents, ref.StreamSeq, r.Tenant)}
	}
	back := &redriven{msg: orig, ref: r}
	row, err := ToRow(s.cfg.RecipientKey, s.cfg.Subjects, orig.Sequence, orig.Time, orig.Subject, orig.Header, orig.Data)
	switch {
	case err != nil:
		return back, &redriveRefused{why: fmt.Sprintf("still cannot be kept: %v", err), back: true}
	case row.Type == string(events.TypeErasureRequested):
		return back, &redriveRefused{why: "an erasure request is not chained late (run otpflow erase again)", back: true}
	}
	if s.cons != nil {
		// Only what the auditor has given up: an event still on its way to it (another
		// auditor's batch) is chained in its turn, with its alerts.
		info, err := s.cons.Info(ctx)
		if err != nil {
			return nil, fmt.Errorf("consumer info: %w", err)
		}
		if ref.StreamSeq > info.AckFloor.Stream {
			return back, &redriveRefused{why: fmt.Sprintf("not given up by the auditor yet (its acknowledgement floor is %d)", info.AckFloor.Stream), back: true}
		}
	}
	back.row = &row
	return back, nil
}

// chain returns rows with each original just before its reference, leaving out those
// given back to OTP_DLQ.
func (b *redriveBatch) chain(rows []*Row) []*Row {
	out := make([]*Row, 0, len(rows)+len(b.originals))
	for _, r := range rows {
		for _, o := range b.originals {
			if o.ref == r && !slices.Contains(b.again, o) {
				out = append(out, o.row)
			}
		}
		out = append(out, r)
	}
	return out
}

// giveBack leaves the originals out of the batch, to go back to OTP_DLQ: the database
// refused one of them again. It reports whether there were any.
func (b *redriveBatch) giveBack() bool {
	n := 0
	for _, o := range b.originals {
		if !slices.Contains(b.again, o) {
			o.why = "refused by the database again"
			b.again = append(b.again, o)
			n++
		}
	}
	return n > 0
}

// before is the batch's AppendAround step, under the chain head's lock: it leaves out an
// original a purge has cut, and erases from the others what a later erasure took.
func (s *Service) redriveBefore(b *redriveBatch) func(ctx context.Context, tx pgx.Tx, rows []*Row) ([]*Row, error) {
	return func(ctx context.Context, tx pgx.Tx, rows []*Row) ([]*Row, error) {
		if len(b.originals) == 0 {
			return rows, nil
		}
		// What checkEvents asks for starts where a purge left the log (purgeFloor):
		// below it, the log keeps no row, and a redrive does not put one back.
		purged, floor, err := purgeFloor(ctx, tx)
		if err != nil {
			return nil, err
		}
		out := rows[:0:0]
		for _, r := range rows {
			if o := b.originals[r]; o != nil && purged && (floor == 0 || r.StreamSeq < floor) {
				o.why = "before what a purge left of the log: drop it"
				b.again = append(b.again, o)
				delete(b.originals, r)
				continue
			}
			out = append(out, r)
		}
		if err := s.eraseRedriven(ctx, tx, b); err != nil {
			return nil, err
		}
		return out, nil
	}
}

// eraseRedriven clears the erasable columns of each original whose person an erasure
// chained after it took, as a replay does (Erasures): by the original's own subject
// hash, or through its challenge, when a row of that challenge (the log's, read again
// from the stream, where the hash still is, or another original of the batch) names a
// person erased after that row. The chain digest is kept.
func (s *Service) eraseRedriven(ctx context.Context, tx pgx.Tx, b *redriveBatch) error {
	type erasureRow struct {
		seq     uint64
		subject string
		payload []byte
	}
	erasuresOf := map[string][]erasureRow{} // by tenant
	for _, o := range b.originals {
		if _, ok := erasuresOf[o.row.Tenant]; ok {
			continue
		}
		rows, err := tx.Query(ctx, `SELECT stream_seq, subject, payload FROM audit.events
			WHERE tenant = $1 AND type = $2 AND chain_pos IS NOT NULL ORDER BY stream_seq`,
			o.row.Tenant, string(events.TypeErasureRequested))
		if err != nil {
			return fmt.Errorf("erasures: %w", err)
		}
		var list []erasureRow
		var e erasureRow
		var seq int64
		if _, err := pgx.ForEachRow(rows, []any{&seq, &e.subject, &e.payload}, func() error {
			e.seq = uint64(seq)
			list = append(list, e)
			return nil
		}); err != nil {
			return fmt.Errorf("erasures: %w", err)
		}
		erasuresOf[o.row.Tenant] = list
	}
	for _, o := range b.originals {
		list := erasuresOf[o.row.Tenant]
		if len(list) == 0 {
			continue
		}
		es := NewErasures()
		for _, e := range list {
			_ = es.Add(e.seq, e.subject, e.payload) // a malformed request erased nobody live either
		}
		// The rows of its challenge, in stream order, it among them: the log's, as their
		// messages say (an erased row has lost its hash), and the batch's other originals.
		group := []*Row{o.row}
		if o.row.ChallengeID != "" {
			seqs, err := challengeSeqs(ctx, tx, o.row.Tenant, o.row.ChallengeID)
			if err != nil {
				return err
			}
			for _, seq := range seqs {
				m, err := platform.GetMsg(ctx, s.js, events.StreamEvents, seq)
				if errors.Is(err, jetstream.ErrMsgNotFound) {
					continue
				}
				if err != nil {
					return fmt.Errorf("%w: read %s %d: %w", platform.ErrUnavailable, events.StreamEvents, seq, err)
				}
				if r, err := ToRow(s.cfg.RecipientKey, s.cfg.Subjects, m.Sequence, m.Time, m.Subject, m.Header, m.Data); err == nil {
					group = append(group, &r)
				}
			}
			for _, other := range b.originals {
				if other == o || other.row.Tenant != o.row.Tenant || other.row.ChallengeID != o.row.ChallengeID {
					continue
				}
				// As its message says: its row may have lost its hash to this loop already.
				m := other.msg
				if r, err := ToRow(s.cfg.RecipientKey, s.cfg.Subjects, m.Sequence, m.Time, m.Subject, m.Header, m.Data); err == nil {
					group = append(group, &r)
				}
			}
		}
		slices.SortFunc(group, func(a, b *Row) int { return cmp.Compare(a.StreamSeq, b.StreamSeq) })
		for _, r := range group {
			es.Apply(r) // o.row itself loses its personal data here, if it must
		}
	}
	return nil
}

// challengeSeqs are the stream sequences of the log's rows of a challenge.
func challengeSeqs(ctx context.Context, tx pgx.Tx, tenant, challenge string) ([]uint64, error) {
	rows, err := tx.Query(ctx, `SELECT stream_seq FROM audit.events WHERE tenant = $1 AND challenge_id = $2 ORDER BY stream_seq`, tenant, challenge)
	if err != nil {
		return nil, fmt.Errorf("rows of a challenge: %w", err)
	}
	var out []uint64
	var seq int64
	_, err = pgx.ForEachRow(rows, []any{&seq}, func() error {
		out = append(out, uint64(seq))
		return nil
	})
	return out, err
}

// redriveThen is the batch's step after its rows are written, in the same transaction:
// the originals given back go to OTP_DLQ before it commits (a repeat after a failed
// commit is one entry: the same message id).
func (s *Service) redriveThen(ctx context.Context, b *redriveBatch) error {
	for _, o := range b.again {
		_, tenant, _ := events.SplitSubject(o.msg.Subject)
		reason := fmt.Sprintf("auditor: redriven (%s %d), not chained: %s", events.StreamEvents, o.ref.StreamSeq, o.why)
		id := fmt.Sprintf("dlq:%s:%d:redrive:%d", events.StreamEvents, o.msg.Sequence, o.ref.StreamSeq)
		if err := platform.PublishDeadLetterOf(ctx, s.js, &platform.DeadLetters{Sealer: s.cfg.DLQKey, Recipient: platform.EventRecipient(s.cfg.Subjects)},
			events.ConsumerAuditor, tenant, events.StreamEvents, o.msg, reason, id); err != nil {
			return fmt.Errorf("%w: %w", platform.ErrUnavailable, err)
		}
	}
	return nil
}

// settled logs and counts what the batch's redrives came to, once it committed: wrote
// are the rows written.
func (s *Service) redrivesSettled(b *redriveBatch, wrote []*Row) {
	for ref, why := range b.refused {
		s.log.Warn("redrive not followed", "seq", ref.StreamSeq, "why", why)
		s.redrives.WithLabelValues("refused").Inc()
	}
	for _, o := range b.again {
		s.log.Warn("redriven event not chained; back in OTP_DLQ", "seq", o.msg.Sequence, "reference", o.ref.StreamSeq, "why", o.why)
		s.redrives.WithLabelValues("refused").Inc()
	}
	for _, o := range b.originals {
		if slices.Contains(b.again, o) {
			continue
		}
		if slices.Contains(wrote, o.row) {
			s.redrives.WithLabelValues("chained").Inc()
			s.written.WithLabelValues(o.row.Type).Inc()
		} else {
			s.redrives.WithLabelValues("already_chained").Inc()
		}
	}
}

// querier is a pool or a transaction.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// purgeFloor reports whether the log was ever purged and, if so, the lowest stream
// sequence it is still asked to hold: the one after the highest a purge cut (the purge
// records it, migrations/00007_purged_seq.sql). For checkpoints of earlier releases,
// which lack it, the lowest sequence of the rows left, leaving out originals a redrive
// chained late, each just before its reference's row (0 when no row is left).
func purgeFloor(ctx context.Context, q querier) (purged bool, floor uint64, err error) {
	var to *int64
	if err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM audit.checkpoints), (SELECT max(purged_to_seq) FROM audit.checkpoints)`).Scan(&purged, &to); err != nil || !purged {
		return false, 0, err
	}
	if to != nil {
		return true, uint64(*to) + 1, nil
	}
	var seq *int64
	err = q.QueryRow(ctx, `SELECT min(e.stream_seq) FROM audit.events e WHERE NOT EXISTS (SELECT 1 FROM audit.events r
			WHERE r.chain_pos = e.chain_pos + 1 AND r.type = $1 AND r.payload->>'action' = 'dlq.redrive'
			  AND r.payload->'redrive'->>'consumer' = 'auditor' AND r.payload->'redrive'->>'stream_seq' = e.stream_seq::text)`,
		string(events.TypeOperatorAction)).Scan(&seq)
	if err != nil {
		return true, 0, fmt.Errorf("purged sequences: %w", err)
	}
	if seq == nil {
		return true, 0, nil
	}
	return true, uint64(*seq), nil
}
