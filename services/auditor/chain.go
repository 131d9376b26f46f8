package auditor

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// canonical encodes v as JSON with object keys sorted and numbers as written, so the
// same event hashes the same whether it comes from the stream or from PostgreSQL's jsonb.
func canonical(raw []byte) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

// piiDigest commits to the personal data of a row; the salt keeps the digest from
// being guessed once the data is erased.
func piiDigest(salt, recipientHash []byte, masked string, pii map[string]string) []byte {
	b, _ := json.Marshal(struct {
		RecipientHash   string            `json:"recipient_hash"`
		RecipientMasked string            `json:"recipient_masked"`
		PII             map[string]string `json:"pii"`
	}{hex.EncodeToString(recipientHash), masked, pii})
	h := sha256.New()
	h.Write(salt)
	h.Write(b)
	return h.Sum(nil)
}

// rowHash is HMAC-SHA256(chain key, prev ‖ canonical content ‖ pii digest).
func rowHash(key, prev []byte, r *Row) ([]byte, error) {
	content, err := rowContent(r)
	if err != nil {
		return nil, err
	}
	h := hmac.New(sha256.New, key)
	h.Write(prev)
	h.Write(content)
	h.Write(r.PIIDigest)
	return h.Sum(nil), nil
}

// rowContent is the canonical content of a row that its hash covers.
func rowContent(r *Row) ([]byte, error) {
	payload := r.Payload
	if !r.payloadCanonical {
		var err error
		if payload, err = canonical(r.Payload); err != nil {
			return nil, fmt.Errorf("canonical payload: %w", err)
		}
	}
	return json.Marshal(struct {
		Seq         uint64          `json:"seq"`
		Subject     string          `json:"subject"`
		Type        string          `json:"type"`
		Tenant      string          `json:"tenant"`
		EventID     string          `json:"event_id"`
		Source      string          `json:"source"`
		OccurredAt  string          `json:"occurred_at"`
		RequestID   string          `json:"request_id"`
		ChallengeID string          `json:"challenge_id"`
		Payload     json.RawMessage `json:"payload"`
	}{r.StreamSeq, r.Subject, r.Type, r.Tenant, r.EventID, r.Source, r.OccurredAt.UTC().Format(time.RFC3339Nano),
		r.RequestID, r.ChallengeID, payload})
}

// Written is what one Append wrote: how many rows, and the last of them (the head it
// left), which the auditor signs into its checkpoints.
type Written struct {
	Rows int
	Head Head
}

// Head is one position of the chain: its row's hash and stream sequence.
type Head struct {
	Pos       int64
	Hash      []byte
	StreamSeq uint64
	KeyID     string // the chain key the row was hashed with
}

// Append writes rows (in stream order) to the log in one transaction: rows already there
// (same stream sequence) are skipped, the others are chained after the head, which is
// row-locked so that any number of writers keep one chain, and hashed with the active
// chain key. The head is locked and moved by audit.lock_head and audit.advance_head: the
// auditor's role may not update it, and the head never moves back.
func (c *Chain) Append(ctx context.Context, pool *pgxpool.Pool, rows []*Row) (Written, error) {
	return c.AppendThen(ctx, pool, rows, nil)
}

// AppendThen is Append, and then, when it wrote any row, runs then in the same
// transaction with the rows it wrote (those not in the log before), while the head is
// still locked: what then writes commits with the rows or not at all, and the writers of
// one log run it one at a time, each after the last one's commit. An error from then
// rolls the batch back.
func (c *Chain) AppendThen(ctx context.Context, pool *pgxpool.Pool, rows []*Row, then func(ctx context.Context, tx pgx.Tx, wrote []*Row) error) (Written, error) {
	return c.AppendAround(ctx, pool, rows, nil, then)
}

// AppendAround is AppendThen, with before run first in the same transaction, once the
// head is locked (so after every writer before it has committed, and before any after
// it): it returns the rows to write in place of rows (it may leave some out or change
// their erasable columns, which the chain holds only through their digest). Nil: rows.
func (c *Chain) AppendAround(ctx context.Context, pool *pgxpool.Pool, rows []*Row,
	before func(ctx context.Context, tx pgx.Tx, rows []*Row) ([]*Row, error),
	then func(ctx context.Context, tx pgx.Tx, wrote []*Row) error) (Written, error) {
	var written Written
	keyID := c.KeyID()
	key, err := c.key(keyID)
	if err != nil {
		return written, err
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		written = Written{}
		var pos int64
		var head []byte
		if err := tx.QueryRow(ctx, `SELECT pos, hash FROM audit.lock_head()`).Scan(&pos, &head); err != nil {
			return fmt.Errorf("chain head: %w", err)
		}
		rows := rows
		if before != nil {
			var err error
			if rows, err = before(ctx, tx, rows); err != nil {
				return err
			}
		}
		seqs := make([]int64, len(rows))
		for i, r := range rows {
			seqs[i] = int64(r.StreamSeq)
		}
		found, err := tx.Query(ctx, `SELECT stream_seq, chain_pos IS NOT NULL FROM audit.events WHERE stream_seq = ANY($1)`, seqs)
		if err != nil {
			return err
		}
		have := map[int64]bool{}
		var seq int64
		var chained bool
		if _, err := pgx.ForEachRow(found, []any{&seq, &chained}, func() error {
			if !chained {
				// Only the auditor writes rows, and always chained: an unchained row for
				// a message it is about to write was put there by someone else.
				return fmt.Errorf("stream sequence %d already has an unchained row: written outside the auditor", seq)
			}
			have[seq] = true
			return nil
		}); err != nil {
			return err
		}
		var copyRows [][]any
		var wrote []*Row
		for _, r := range rows {
			if have[int64(r.StreamSeq)] {
				continue
			}
			have[int64(r.StreamSeq)] = true
			pos++
			r.ChainPos, r.PrevHash, r.ChainKeyID = pos, head, keyID
			if r.RowHash, err = rowHash(key, head, r); err != nil {
				return err
			}
			head = r.RowHash
			written.Head = Head{Pos: pos, Hash: head, StreamSeq: r.StreamSeq, KeyID: keyID}
			var pii any
			if r.PII != nil {
				pii = r.PII
			}
			wrote = append(wrote, r)
			copyRows = append(copyRows, []any{int64(r.StreamSeq), r.Subject, r.Type, r.Tenant, r.EventID, r.Source, r.OccurredAt,
				r.RequestID, r.ChallengeID, r.RecipientHash, r.RecipientMasked, string(r.Payload),
				r.ChainPos, r.PrevHash, r.RowHash, pii, r.PIISalt, r.PIIDigest, r.ChainKeyID})
		}
		if len(copyRows) == 0 {
			return nil
		}
		if _, err := tx.CopyFrom(ctx, pgx.Identifier{"audit", "events"}, []string{"stream_seq", "subject", "type", "tenant",
			"event_id", "source", "occurred_at", "request_id", "challenge_id", "recipient_hash", "recipient_masked", "payload",
			"chain_pos", "prev_hash", "row_hash", "pii", "pii_salt", "pii_digest", "chain_key_id"}, pgx.CopyFromRows(copyRows)); err != nil {
			return fmt.Errorf("copy audit rows: %w", err)
		}
		written.Rows = len(copyRows)
		if _, err = tx.Exec(ctx, `SELECT audit.advance_head($1, $2)`, pos, head); err != nil || then == nil {
			return err
		}
		return then(ctx, tx, wrote)
	})
	return written, err
}

// Report is the result of a chain verification.
type Report struct {
	Rows     int64
	FirstPos int64
	LastPos  int64
	Erased   int64
	PurgedTo int64 // the last position removed by a purge; 0 when none
	Anchored int64 // rows held to a signed checkpoint
	Events   int64 // OTP_EVENTS messages found to have their row
	// Checkpoints is how many signed checkpoints were checked, NewestCheckpoint the
	// position of the newest.
	Checkpoints      int64
	NewestCheckpoint int64
	BrokenPos        int64  // chain position of the first broken row; 0 when intact
	BrokenSeq        int64  // its stream sequence
	Problem          string // what is wrong with it
}

// OK reports whether the chain is intact.
func (r Report) OK() bool { return r.Problem == "" }

// ErrNoLog is returned when the audit schema does not exist.
var ErrNoLog = errors.New("no audit log in this database")

// Verify walks the chain in order and recomputes every link with the chain key: it finds
// an edited row (its hash no longer matches, and cannot be recomputed without the key), a
// deleted one (a gap, or a broken link), an inserted one (a link to nothing before it), a
// reordered pair (links out of order), rows cut off the end (the head no longer matches
// the last row) and any purge checkpoint that no purge wrote (the MAC of every one is
// checked, not only the newest, so a later purge does not launder it). It cannot see a tail cut
// together with the head: VerifyAnchored checks that against the signed checkpoints and
// OTP_EVENTS.
func (c *Chain) Verify(ctx context.Context, pool *pgxpool.Pool) (Report, error) {
	return c.verify(ctx, pool, nil)
}

// verify is Verify that also holds the rows at the positions of signed checkpoints
// (want: position → row hash) to them.
func (c *Chain) verify(ctx context.Context, pool *pgxpool.Pool, want map[int64][]byte) (Report, error) {
	var rep Report
	var headPos int64
	var headHash []byte
	if err := pool.QueryRow(ctx, `SELECT pos, hash FROM audit.chain_head`).Scan(&headPos, &headHash); err != nil {
		return rep, fmt.Errorf("%w: %v", ErrNoLog, err)
	}
	prevPos, prev := int64(0), make([]byte, 32)
	// Every purge checkpoint is held to its MAC, not only the newest: a forged one (rows
	// deleted outside a purge) stays forged after a later, genuine purge. The chain of what
	// remains starts from the newest.
	cps, err := pool.Query(ctx, `SELECT pos, hash, coalesce(key_id, ''), mac FROM audit.checkpoints ORDER BY pos`)
	if err != nil {
		return rep, fmt.Errorf("purge checkpoints: %w", err)
	}
	var cpPos int64
	var cpHash, cpMAC []byte
	var cpKeyID string
	_, err = pgx.ForEachRow(cps, []any{&cpPos, &cpHash, &cpKeyID, &cpMAC}, func() error {
		if mac, err := c.checkpointMAC(cpKeyID, cpPos, cpHash); (err != nil || !hmac.Equal(mac, cpMAC)) && rep.Problem == "" {
			rep.BrokenPos, rep.Problem = cpPos, fmt.Sprintf("the purge checkpoint at chain position %d is not authenticated by the chain key (forged: rows deleted outside a purge)", cpPos)
		}
		prevPos, prev = cpPos, bytes.Clone(cpHash)
		rep.PurgedTo = cpPos
		return nil
	})
	if err != nil {
		return rep, fmt.Errorf("purge checkpoints: %w", err)
	}
	rows, err := pool.Query(ctx, `SELECT chain_pos, stream_seq, subject, type, tenant, event_id, source, occurred_at, request_id,
		challenge_id, payload, recipient_hash, recipient_masked, pii, pii_salt, pii_digest, prev_hash, row_hash, coalesce(chain_key_id, '')
		FROM audit.events ORDER BY chain_pos NULLS FIRST, stream_seq`)
	if err != nil {
		return rep, err
	}
	defer rows.Close()
	broken := func(r *Row, problem string) {
		if rep.Problem == "" {
			rep.BrokenPos, rep.BrokenSeq, rep.Problem = r.ChainPos, int64(r.StreamSeq), problem
		}
	}
	for rows.Next() {
		var r Row
		var pos *int64
		var seq int64
		var payload []byte
		var pii map[string]string
		if err := rows.Scan(&pos, &seq, &r.Subject, &r.Type, &r.Tenant, &r.EventID, &r.Source, &r.OccurredAt, &r.RequestID,
			&r.ChallengeID, &payload, &r.RecipientHash, &r.RecipientMasked, &pii, &r.PIISalt, &r.PIIDigest, &r.PrevHash, &r.RowHash,
			&r.ChainKeyID); err != nil {
			return rep, err
		}
		r.StreamSeq, r.Payload, r.PII = uint64(seq), payload, pii
		rep.Rows++
		if pos == nil {
			broken(&r, "row outside the chain (inserted)")
			continue
		}
		r.ChainPos = *pos
		if rep.FirstPos == 0 {
			rep.FirstPos = r.ChainPos
		}
		rep.LastPos = r.ChainPos
		switch {
		case r.ChainPos != prevPos+1:
			broken(&r, fmt.Sprintf("rows %d to %d of the chain are missing (deleted)", prevPos+1, r.ChainPos-1))
		case !bytes.Equal(r.PrevHash, prev):
			broken(&r, "does not link to the row before it (inserted or reordered)")
		}
		if r.PIISalt == nil {
			rep.Erased++
			if r.RecipientHash != nil || r.RecipientMasked != "" || r.PII != nil {
				broken(&r, "marked erased but carries personal data (forged)")
			}
		} else if !bytes.Equal(piiDigest(r.PIISalt, r.RecipientHash, r.RecipientMasked, r.PII), r.PIIDigest) {
			broken(&r, "personal data changed (edited)")
		}
		if key, err := c.key(r.ChainKeyID); err != nil {
			broken(&r, fmt.Sprintf("hashed under no chain key this verifier holds (%q): rehashed without the key", r.ChainKeyID))
		} else if h, err := rowHash(key, r.PrevHash, &r); err != nil || !hmac.Equal(h, r.RowHash) {
			broken(&r, "content does not match its keyed hash (edited, or rehashed without the chain key)")
		}
		if w, ok := want[r.ChainPos]; ok {
			rep.Anchored++
			if !bytes.Equal(w, r.RowHash) {
				broken(&r, "differs from the signed checkpoint of this position (rewritten)")
			}
		}
		prevPos, prev = r.ChainPos, r.RowHash
	}
	if err := rows.Err(); err != nil {
		return rep, err
	}
	if rep.Problem == "" && (prevPos != headPos || !bytes.Equal(prev, headHash)) {
		rep.BrokenPos, rep.Problem = prevPos+1, fmt.Sprintf("the chain ends at %d but its head is at %d (rows deleted at the end)", prevPos, headPos)
	}
	return rep, nil
}

// Backfill chains rows written before the chain existed (chain_pos NULL), in stream
// order after the current head, under the active chain key; key is the recipient key
// (OTP_AUDIT_KEY) their salts derive from. The rows are chained, and the head moved, by
// audit.chain_legacy as the log's owner; the trigger keeps their content as it was.
func (c *Chain) Backfill(ctx context.Context, pool *pgxpool.Pool, key []byte) (int, error) {
	n := 0
	keyID := c.KeyID()
	chainKey, err := c.key(keyID)
	if err != nil {
		return 0, err
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var pos int64
		var head []byte
		if err := tx.QueryRow(ctx, `SELECT pos, hash FROM audit.lock_head()`).Scan(&pos, &head); err != nil {
			return err
		}
		// Backfill is for a log written before the chain existed. Once the chain has
		// begun, an unchained row was inserted behind the auditor's back: chaining it
		// would launder it under the real key (audit.chain_legacy refuses it too).
		var chained, unchained bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM audit.events WHERE chain_pos IS NOT NULL),
			EXISTS (SELECT 1 FROM audit.events WHERE chain_pos IS NULL)`).Scan(&chained, &unchained); err != nil {
			return err
		}
		if chained && unchained {
			return errors.New("unchained rows in a chained log: inserted outside the auditor; run otpflow audit verify")
		}
		rows, err := tx.Query(ctx, `SELECT stream_seq, subject, type, tenant, event_id, source, occurred_at, request_id, challenge_id,
			payload, recipient_hash, recipient_masked FROM audit.events WHERE chain_pos IS NULL ORDER BY stream_seq`)
		if err != nil {
			return err
		}
		var legacy []*Row
		for rows.Next() {
			r := &Row{}
			var seq int64
			var payload []byte
			if err := rows.Scan(&seq, &r.Subject, &r.Type, &r.Tenant, &r.EventID, &r.Source, &r.OccurredAt, &r.RequestID,
				&r.ChallengeID, &payload, &r.RecipientHash, &r.RecipientMasked); err != nil {
				rows.Close()
				return err
			}
			r.StreamSeq, r.Payload = uint64(seq), payload
			legacy = append(legacy, r)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if len(legacy) == 0 {
			return nil
		}
		var seqs []int64
		var prevs, hashes, salts, digests [][]byte
		for _, r := range legacy {
			r.PIISalt = piiSalt(key, r.StreamSeq)
			r.PIIDigest = piiDigest(r.PIISalt, r.RecipientHash, r.RecipientMasked, nil)
			pos++
			r.ChainPos, r.PrevHash, r.ChainKeyID = pos, head, keyID
			if r.RowHash, err = rowHash(chainKey, head, r); err != nil {
				return err
			}
			head = r.RowHash
			seqs, prevs, hashes = append(seqs, int64(r.StreamSeq)), append(prevs, r.PrevHash), append(hashes, r.RowHash)
			salts, digests = append(salts, r.PIISalt), append(digests, r.PIIDigest)
		}
		n = len(legacy)
		_, err = tx.Exec(ctx, `SELECT audit.chain_legacy($1, $2, $3, $4, $5, $6)`, seqs, prevs, hashes, salts, digests, keyID)
		return err
	})
	return n, err
}
