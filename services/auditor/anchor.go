package auditor

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// Signer signs checkpoints of the chain head with Ed25519 (OTP_AUDIT_SIGNING_KEY: a ring of
// 32-byte seeds, "id:base64,…", the first active). Verifying needs only the public keys.
type Signer struct {
	id   string
	priv ed25519.PrivateKey
	pubs map[string]ed25519.PublicKey
}

// ParseSigningKey reads a ring of Ed25519 seeds.
func ParseSigningKey(value string) (*Signer, error) {
	r, err := keys.Parse(value, 32, ed25519.SeedSize)
	if err != nil {
		return nil, err
	}
	s := &Signer{id: r.ActiveID(), pubs: map[string]ed25519.PublicKey{}}
	for _, id := range r.IDs() {
		priv := ed25519.NewKeyFromSeed(r.Key(id))
		if id == s.id {
			s.priv = priv
		}
		s.pubs[id] = priv.Public().(ed25519.PublicKey)
	}
	return s, nil
}

// PublicKeys are the public halves of the ring, by key id.
func (s *Signer) PublicKeys() map[string]ed25519.PublicKey { return s.pubs }

// ParsePublicKeys reads checkpoint verification keys: "id:base64,…" of 32-byte Ed25519
// public keys.
func ParsePublicKeys(value string) (map[string]ed25519.PublicKey, error) {
	r, err := keys.Parse(value, 32, ed25519.PublicKeySize)
	if err != nil {
		return nil, err
	}
	pubs := map[string]ed25519.PublicKey{}
	for _, id := range r.IDs() {
		pubs[id] = ed25519.PublicKey(r.Key(id))
	}
	return pubs, nil
}

// signedBytes is what a checkpoint's signature covers: a fixed label, then position,
// stream sequence and time (Unix nanoseconds) as big-endian 64-bit integers, then the
// row hash, the chain key id and the signing key id, each preceded by its length as one byte.
func signedBytes(cp *events.AuditCheckpoint) []byte {
	b := []byte("otpflow-audit-checkpoint-v1\x00")
	b = binary.BigEndian.AppendUint64(b, uint64(cp.Pos))
	b = binary.BigEndian.AppendUint64(b, cp.StreamSeq)
	b = binary.BigEndian.AppendUint64(b, uint64(cp.At.UnixNano()))
	for _, f := range [][]byte{cp.RowHash, []byte(cp.ChainKeyID), []byte(cp.SigningKeyID)} {
		b = append(b, byte(len(f)))
		b = append(b, f...)
	}
	return b
}

// Sign returns the signed checkpoint of head at time at.
func (s *Signer) Sign(head Head, at time.Time) events.AuditCheckpoint {
	cp := events.AuditCheckpoint{Pos: head.Pos, RowHash: head.Hash, StreamSeq: head.StreamSeq, ChainKeyID: head.KeyID,
		At: at.UTC(), SigningKeyID: s.id}
	cp.Signature = ed25519.Sign(s.priv, signedBytes(&cp))
	return cp
}

// PublishCheckpoint signs head and publishes it to OTP_AUDIT, once per position.
func PublishCheckpoint(ctx context.Context, js jetstream.JetStream, s *Signer, head Head) error {
	cp := s.Sign(head, time.Now())
	b, err := json.Marshal(cp)
	if err != nil {
		return err
	}
	m := nats.NewMsg(events.SubjectAuditCheckpoint)
	m.Data = b
	m.Header.Set(jetstream.MsgIDHeader, "checkpoint:"+strconv.FormatInt(head.Pos, 10))
	_, err = js.PublishMsg(ctx, m)
	return err
}

// DefaultCheckedCheckpoints is how many of the newest checkpoints VerifyAnchored reads.
const DefaultCheckedCheckpoints = 100

// Anchors are what VerifyAnchored holds the table to, outside PostgreSQL.
type Anchors struct {
	JS jetstream.JetStream
	// PublicKeys verify the checkpoints' signatures, by signing key id.
	PublicKeys map[string]ed25519.PublicKey
	// Checkpoints is how many of the newest checkpoints are read; 0: DefaultCheckedCheckpoints.
	Checkpoints int
}

// VerifyAnchored is Verify, and more: the newest signed checkpoints on OTP_AUDIT must carry a
// valid signature, each checkpointed position must still hold a row with that very hash
// (unless a purge authenticated by the chain key removed it), the table must not end before
// the newest checkpoint, and every OTP_EVENTS message from the first row's stream sequence
// up to the newest checkpoint and the auditor's acknowledged floor must have its row.
func (c *Chain) VerifyAnchored(ctx context.Context, pool *pgxpool.Pool, a Anchors) (Report, error) {
	cps, err := newestCheckpoints(ctx, a.JS, a.Checkpoints)
	if err != nil {
		return Report{}, err
	}
	want := map[int64][]byte{}
	var newest *events.AuditCheckpoint
	var badSig *events.AuditCheckpoint
	for i := range cps {
		cp := &cps[i]
		pub, ok := a.PublicKeys[cp.SigningKeyID]
		if !ok || !ed25519.Verify(pub, signedBytes(cp), cp.Signature) {
			if badSig == nil {
				badSig = cp
			}
			continue
		}
		want[cp.Pos] = cp.RowHash
		if newest == nil || cp.Pos > newest.Pos {
			newest = cp
		}
	}
	rep, err := c.verify(ctx, pool, want)
	if err != nil {
		return rep, err
	}
	rep.Checkpoints = int64(len(want))
	if newest != nil {
		rep.NewestCheckpoint = newest.Pos
	}
	if rep.Problem != "" {
		return rep, nil
	}
	if badSig != nil {
		rep.BrokenPos, rep.Problem = badSig.Pos, fmt.Sprintf("a checkpoint on %s for this position has no valid signature (forged)", events.StreamAudit)
		return rep, nil
	}
	if newest != nil && newest.Pos > rep.LastPos && newest.Pos > rep.PurgedTo {
		rep.BrokenPos, rep.BrokenSeq = rep.LastPos+1, int64(newest.StreamSeq)
		rep.Problem = fmt.Sprintf("the table ends at chain position %d, but a signed checkpoint vouches for position %d (rows cut from the end)",
			rep.LastPos, newest.Pos)
		return rep, nil
	}
	if newest == nil && rep.Rows > 0 {
		var oldest time.Time
		if err := pool.QueryRow(ctx, `SELECT min(recorded_at) FROM audit.events`).Scan(&oldest); err == nil && time.Since(oldest) > checkpointGrace {
			rep.Problem = fmt.Sprintf("no signed checkpoint on %s vouches for a log written more than %v ago (checkpoints deleted?)", events.StreamAudit, checkpointGrace)
			return rep, nil
		}
	}
	var upTo uint64
	if newest != nil {
		upTo = newest.StreamSeq
	}
	if err := c.checkEvents(ctx, pool, a.JS, upTo, &rep); err != nil {
		return rep, err
	}
	return rep, nil
}

// checkpointGrace is how long a log may hold rows before its first signed checkpoint
// (the auditor signs one every 10 s by default).
const checkpointGrace = time.Minute

// newestCheckpoints reads up to n of the newest messages of OTP_AUDIT.
func newestCheckpoints(ctx context.Context, js jetstream.JetStream, n int) ([]events.AuditCheckpoint, error) {
	if n <= 0 {
		n = DefaultCheckedCheckpoints
	}
	st, err := js.Stream(ctx, events.StreamAudit)
	if err != nil {
		return nil, fmt.Errorf("checkpoints: %w", err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("checkpoints: %w", err)
	}
	var cps []events.AuditCheckpoint
	for seq := info.State.LastSeq; seq >= info.State.FirstSeq && seq > 0 && len(cps) < n; seq-- {
		m, err := st.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("checkpoint %d: %w", seq, err)
		}
		var cp events.AuditCheckpoint
		if err := json.Unmarshal(m.Data, &cp); err != nil {
			cp = events.AuditCheckpoint{} // unreadable: no valid signature either
		}
		cps = append(cps, cp)
	}
	return cps, nil
}

// checkEvents finds OTP_EVENTS messages without a row: from the one after the last a
// purge cut (purgeFloor; the stream's first message when nothing was purged) up to the later
// of upTo and the auditor consumer's acknowledged floor. A message the auditor could not
// decode went to the DLQ instead and has no row by design.
func (c *Chain) checkEvents(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, upTo uint64, rep *Report) error {
	cons, err := js.Consumer(ctx, events.StreamEvents, events.ConsumerAuditor)
	if err != nil {
		return fmt.Errorf("the auditor's consumer on %s: %w (deleted?)", events.StreamEvents, err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return fmt.Errorf("the auditor's consumer on %s: %w", events.StreamEvents, err)
	}
	upTo = max(upTo, info.AckFloor.Stream)
	// Every row the table holds must match its message, not only the checkpointed ones.
	var maxSeq int64
	if err := pool.QueryRow(ctx, `SELECT coalesce(max(stream_seq), 0) FROM audit.events`).Scan(&maxSeq); err != nil {
		return err
	}
	upTo = max(upTo, uint64(maxSeq))
	var from int64
	if rep.PurgedTo > 0 {
		_, floor, err := purgeFloor(ctx, pool)
		if err != nil {
			return err
		}
		from = int64(floor)
	}
	if upTo == 0 || (from > 0 && uint64(from) > upTo) {
		return nil
	}
	rows, err := pool.Query(ctx, `SELECT stream_seq, subject, type, tenant, event_id, source, occurred_at, request_id, challenge_id, payload
		FROM audit.events WHERE stream_seq BETWEEN $1 AND $2 ORDER BY stream_seq`, from, int64(upTo))
	if err != nil {
		return err
	}
	var have []int64
	content := map[int64][]byte{}
	var r Row
	var seq int64
	if _, err := pgx.ForEachRow(rows, []any{&seq, &r.Subject, &r.Type, &r.Tenant, &r.EventID, &r.Source, &r.OccurredAt, &r.RequestID,
		&r.ChallengeID, &r.Payload}, func() error {
		r.StreamSeq = uint64(seq)
		b, err := rowContent(&r)
		if err != nil {
			return err
		}
		have, content[seq] = append(have, seq), b
		return nil
	}); err != nil {
		return err
	}
	i, reached := 0, false
	_, err = platform.ScanStream(ctx, js, events.StreamEvents, platform.Scan{From: uint64(max(from, 1))}, func(m *jetstream.RawStreamMsg) error {
		seq := m.Sequence
		if seq >= upTo {
			reached = true
		}
		if seq > upTo {
			return platform.ErrStopScan
		}
		for i < len(have) && uint64(have[i]) < seq {
			i++
		}
		if i < len(have) && uint64(have[i]) == seq {
			rep.Events++
			// The row must say what the message says: a row forged in the database under
			// a real message's sequence (and chained by a later backfill) differs here.
			if got, err := ToRow(nil, nil, seq, m.Time, m.Subject, m.Header, m.Data); err == nil {
				if want, err := rowContent(&got); err == nil && !bytes.Equal(want, content[int64(seq)]) {
					rep.BrokenSeq = int64(seq)
					rep.Problem = fmt.Sprintf("the row for stream sequence %d does not match its %s message (forged)", seq, events.StreamEvents)
					return platform.ErrStopScan
				}
			}
			i++
		} else if _, err := ToRow(nil, nil, seq, m.Time, m.Subject, m.Header, m.Data); err == nil {
			rep.BrokenSeq = int64(seq)
			rep.Problem = fmt.Sprintf("%s holds %s at stream sequence %d, but the table has no row for it (deleted)",
				events.StreamEvents, m.Subject, seq)
			return platform.ErrStopScan
		}
		if reached {
			return platform.ErrStopScan
		}
		return nil
	})
	if err != nil {
		return err
	}
	if rep.Problem == "" && !reached && i < len(have) {
		// Rows beyond the stream's end: messages that never existed.
		rep.BrokenSeq = have[i]
		rep.Problem = fmt.Sprintf("the table has a row for stream sequence %d, which %s does not hold (inserted)", have[i], events.StreamEvents)
	}
	return nil
}
