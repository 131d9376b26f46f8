package auditor

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// The auditor's part of an erasure. It reads otp.erasure_requested with every other
// event, in stream order, so when one is chained every earlier row about the person is
// already in the log: those rows lose their personal data (EraseSubjects), and the
// auditor answers with otp.erased. Rows about the person that come later (a code of
// theirs verified after the erasure) are kept as they come: an erasure is of what was
// known when it was asked. A replay applies the same rule (Erasures), so it never
// rebuilds what was erased.

// EraseChained applies the chained otp.erasure_requested row at stream sequence seq: the
// personal data of the person it names goes from every row before it about them, and
// from every row of one of their challenges, and the salt with it, so the digest the
// chain holds can no longer be tied to the person. The chain stays verifiable. It runs in
// audit.erase_subject, as the log's owner, which reads whom to erase from that row and
// nothing else. It returns the number of rows erased; a repeat erases none.
func EraseChained(ctx context.Context, pool *pgxpool.Pool, seq uint64) (int64, error) {
	var n int64
	err := pool.QueryRow(ctx, `SELECT audit.erase_subject($1)`, int64(seq)).Scan(&n)
	return n, err
}

// subjectHashValue is how a subject hash is kept in the recipient_hash column.
func subjectHashValue(h string) []byte { return []byte(h) }

// errEarlierUnwritten: an erasure's row is chained, but an earlier event is not yet
// written, by this auditor or another; the erasure is done once it is.
var errEarlierUnwritten = errors.New("an earlier event is not written yet")

// eraseChained does the erasures among rows just chained and answers each (eraseRow).
func (s *Service) eraseChained(ctx context.Context, rows []*Row) error {
	inBatch := map[uint64]bool{}
	for _, r := range rows {
		inBatch[r.StreamSeq] = true
	}
	for _, r := range rows {
		if err := s.eraseRow(ctx, r, inBatch); err != nil {
			return err
		}
	}
	return nil
}

// eraseRow does the erasure of r, a row just chained, if it is one, and answers it. An
// erasure waits until every earlier event is in the log: a batch redelivered after a
// crash, or another auditor's, may still hold rows about the person with lower sequences.
// They are there once the consumer's acknowledgement floor, with the rows of this batch
// (inBatch), covers every sequence below the erasure's; until then it fails with
// errEarlierUnwritten.
func (s *Service) eraseRow(ctx context.Context, r *Row, inBatch map[uint64]bool) error {
	if r.Type != string(events.TypeErasureRequested) {
		return nil
	}
	if missing, err := s.earlierUnwritten(ctx, r.StreamSeq, inBatch); err != nil {
		return err
	} else if missing != 0 {
		return fmt.Errorf("erasure at stream sequence %d waits for the event at %d: %w", r.StreamSeq, missing, errEarlierUnwritten)
	}
	req, err := platform.DecodeErasure(r.Subject, r.Payload)
	if err != nil {
		// Chained as it came; nothing names whom to erase. The other services
		// dead-letter it with the reason.
		s.log.Error("malformed erasure request", "seq", r.StreamSeq, "err", err)
		return nil
	}
	n, err := EraseChained(ctx, s.pool, r.StreamSeq)
	if err != nil {
		return fmt.Errorf("erasure %s: %w", req.ErasureID, err)
	}
	if err := platform.PublishErased(ctx, s.js, "auditor", req, n); err != nil {
		return err
	}
	s.log.Info("erased a person", "erasure_id", req.ErasureID, "tenant", req.Tenant, "rows", n)
	return nil
}

// earlierUnwritten returns a stream sequence below seq that is neither acknowledged by the
// auditor's consumer nor in the batch at hand, or 0 when there is none.
func (s *Service) earlierUnwritten(ctx context.Context, seq uint64, inBatch map[uint64]bool) (uint64, error) {
	if s.cons == nil {
		return 0, nil // not consuming (a test of the batch alone)
	}
	info, err := s.cons.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("consumer info: %w", err)
	}
	for q := info.AckFloor.Stream + 1; q < seq; q++ {
		if !inBatch[q] {
			return q, nil
		}
	}
	return 0, nil
}

// Erasures are the erasures found on OTP_EVENTS, for a replay: a row is erased when an
// erasure of its person (by subject hash, or through one of their challenges) comes
// later in the stream.
type Erasures struct {
	// last is, per tenant and subject hash, the stream sequence of the newest erasure.
	last map[string]uint64
	// challenges maps a challenge of an erased person to that erasure's sequence.
	challenges map[string]uint64
}

// NewErasures returns an empty set.
func NewErasures() *Erasures {
	return &Erasures{last: map[string]uint64{}, challenges: map[string]uint64{}}
}

// Add records an otp.erasure_requested message at stream sequence seq.
func (e *Erasures) Add(seq uint64, subject string, data []byte) error {
	req, err := platform.DecodeErasure(subject, data)
	if err != nil {
		return err
	}
	for _, h := range req.RecipientHashes {
		k := req.Tenant + "\x00" + string(subjectHashValue(h))
		e.last[k] = max(e.last[k], seq)
	}
	return nil
}

// Len is how many subject hashes are erased.
func (e *Erasures) Len() int { return len(e.last) }

// Apply clears the personal data of r when an erasure of its person comes after it, and
// remembers the challenges of such rows, so their other rows (rows are applied in stream
// order) are erased too. It reports whether it erased r.
func (e *Erasures) Apply(r *Row) bool {
	at, ok := uint64(0), false
	if h := r.PII["subject_hash"]; h != "" {
		at, ok = e.last[r.Tenant+"\x00"+h]
		ok = ok && r.StreamSeq < at
	}
	if !ok && r.RecipientHash != nil {
		at, ok = e.last[r.Tenant+"\x00"+string(r.RecipientHash)]
		ok = ok && r.StreamSeq < at
		if ok && r.ChallengeID != "" {
			e.challenges[r.Tenant+"\x00"+r.ChallengeID] = max(e.challenges[r.Tenant+"\x00"+r.ChallengeID], at)
		}
	}
	if !ok && r.ChallengeID != "" {
		at, ok = e.challenges[r.Tenant+"\x00"+r.ChallengeID]
		ok = ok && r.StreamSeq < at
	}
	if !ok {
		return false
	}
	r.RecipientHash, r.RecipientMasked, r.PII, r.PIISalt = nil, "", nil, nil
	return true
}
