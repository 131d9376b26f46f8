package auditor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// The attacks below are each made by an insider with full database access (the superuser,
// triggers off) who holds neither the chain key nor the signing key; the log was written by
// a real auditor from OTP_EVENTS and anchored by its signed checkpoints.

var testSigner = func() *Signer {
	s, err := ParseSigningKey("sig1:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{9}, 32)))
	if err != nil {
		panic(err)
	}
	return s
}()

type anchoredLog struct {
	pool    *pgxpool.Pool
	js      jetstream.JetStream
	anchors Anchors
}

// anchored publishes n events (the first old of them 500 days old), lets an auditor write
// and checkpoint them (sign: with a signing key), and stops it.
func anchored(t *testing.T, n, old int, sign bool) *anchoredLog {
	t.Helper()
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	cfg := Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ, CheckpointEvery: 20 * time.Millisecond, VerifyEvery: time.Hour}
	if sign {
		cfg.Signer = testSigner
	}
	svc, err := New(cfg, pool, js, testenv.Logger(io.Discard), nil)
	testenv.Must(t, err, "new auditor")
	stop := testenv.Start(t, svc.Run)
	for i := 1; i <= n; i++ {
		typ, body := events.TypeIssued, fmt.Sprintf(`{"challenge_id":"c-%d","request_id":"r-%d","recipient":"u%d@example.com","client_ip":"203.0.113.%d","code_seq":1,"max_attempts":5}`, i, i, i, i)
		if i%2 == 0 {
			typ, body = events.TypeDelivered, fmt.Sprintf(`{"challenge_id":"c-%d","request_id":"r-%d","provider":"ses","attempts":1}`, i-1, i-1)
		}
		at := time.Now()
		if i <= old {
			at = at.Add(-500 * 24 * time.Hour)
		}
		m, err := events.NewMsg(typ, "acme", fmt.Sprintf("e-%d", i), "", jsonRaw(body), events.Envelope{Source: "test", Time: at})
		testenv.Must(t, err, "msg")
		_, err = js.PublishMsg(context.Background(), m)
		testenv.Must(t, err, "publish")
	}
	l := &anchoredLog{pool: pool, js: js, anchors: Anchors{JS: js, PublicKeys: testSigner.PublicKeys()}}
	testenv.Eventually(t, 20*time.Second, "every event written and checkpointed", func() bool {
		var rows int
		_ = pool.QueryRow(context.Background(), `SELECT count(*) FROM audit.events`).Scan(&rows)
		if rows != n {
			return false
		}
		if !sign {
			return true
		}
		cps, _ := newestCheckpoints(context.Background(), js, 1)
		return len(cps) == 1 && cps[0].Pos == int64(n)
	})
	stop()
	return l
}

func (l *anchoredLog) verify(t *testing.T) Report {
	t.Helper()
	rep, err := testChain.VerifyAnchored(context.Background(), l.pool, l.anchors)
	testenv.Must(t, err, "verify anchored")
	return rep
}

func wantBroken(t *testing.T, rep Report, pos int64, problem string) {
	t.Helper()
	if rep.OK() || rep.BrokenPos != pos || !strings.Contains(rep.Problem, problem) {
		t.Fatalf("report %+v, want broken at %d (%s)", rep, pos, problem)
	}
}

func TestAnchoredLogVerifies(t *testing.T) {
	l := anchored(t, 20, 0, true)
	if rep := l.verify(t); !rep.OK() || rep.Rows != 20 || rep.Checkpoints == 0 || rep.NewestCheckpoint != 20 || rep.Events != 20 {
		t.Fatalf("report %+v", rep)
	}
}

func TestInsiderAttacks(t *testing.T) {
	tests := []struct {
		name, sql string
		pos       int64
		problem   string
	}{
		{"edited row", `UPDATE audit.events SET payload = jsonb_set(payload, '{provider}', '"smtp"') WHERE chain_pos = 8`, 8, "edited"},
		{"deleted row", `DELETE FROM audit.events WHERE chain_pos = 11`, 12, "deleted"},
		{"inserted row", `UPDATE audit.events SET chain_pos = -(chain_pos + 1) WHERE chain_pos >= 15;
			UPDATE audit.events SET chain_pos = -chain_pos WHERE chain_pos < 0;
			INSERT INTO audit.events (stream_seq, subject, type, tenant, event_id, source, occurred_at, payload, chain_pos, prev_hash, row_hash, pii_digest, chain_key_id)
			SELECT 999, subject, type, tenant, 'x', 'evil', occurred_at, payload, 15, prev_hash, row_hash, pii_digest, chain_key_id FROM audit.events WHERE chain_pos = 14`, 15, "inserted"},
		{"reordered rows", `UPDATE audit.events SET chain_pos = -1 WHERE chain_pos = 6; UPDATE audit.events SET chain_pos = 6 WHERE chain_pos = 7;
			UPDATE audit.events SET chain_pos = 7 WHERE chain_pos = -1`, 6, "reordered"},
		// Today's hole: the keyed chain still links, only the anchor knows the tail.
		{"cut tail with a rewound head", `DELETE FROM audit.events WHERE chain_pos >= 19;
			UPDATE audit.chain_head SET pos = 18, hash = (SELECT row_hash FROM audit.events WHERE chain_pos = 18)`, 19, "cut from the end"},
		{"forged purge checkpoint row", `SET otpflow.audit_purge = 'on';
			INSERT INTO audit.checkpoints (pos, hash) SELECT chain_pos, row_hash FROM audit.events WHERE chain_pos = 4;
			DELETE FROM audit.events WHERE chain_pos <= 4`, 4, "not authenticated by the chain key"},
		// No trigger bypass: the session setting alone opens DELETE (point 4 will close it).
		{"purge without the purge role", `SET otpflow.audit_purge = 'on'; DELETE FROM audit.events WHERE chain_pos >= 17;
			UPDATE audit.chain_head SET pos = 16, hash = (SELECT row_hash FROM audit.events WHERE chain_pos = 16); RESET otpflow.audit_purge`, 17, "cut from the end"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := anchored(t, 20, 0, true)
			tamper(t, l.pool, tc.sql)
			wantBroken(t, l.verify(t), tc.pos, tc.problem)
		})
	}
}

// TestCutTailIsSeenInOTPEvents: without any checkpoint (no signing key), a cut tail with a
// rewound head still shows: OTP_EVENTS holds the events, acknowledged by the auditor.
func TestCutTailIsSeenInOTPEvents(t *testing.T) {
	l := anchored(t, 20, 0, false)
	tamper(t, l.pool, `DELETE FROM audit.events WHERE chain_pos >= 19;
		UPDATE audit.chain_head SET pos = 18, hash = (SELECT row_hash FROM audit.events WHERE chain_pos = 18)`)
	if rep, err := testChain.Verify(context.Background(), l.pool); err != nil || !rep.OK() {
		t.Fatalf("the table alone should look intact: %+v %v", rep, err)
	}
	rep := l.verify(t)
	if rep.OK() || rep.BrokenSeq != 19 || !strings.Contains(rep.Problem, "no row for it (deleted)") {
		t.Fatalf("report %+v, want stream sequence 19 missing", rep)
	}
}

// TestDeletedRowsRehashedWithoutTheKey: the insider deletes rows and recomputes every hash
// after them as the chain used to be (plain SHA-256), head included. The table alone
// refuses it: the hashes are not keyed.
func TestDeletedRowsRehashedWithoutTheKey(t *testing.T) {
	l := anchored(t, 20, 0, false)
	tamper(t, l.pool, `DELETE FROM audit.events WHERE chain_pos IN (9, 10)`)
	rehashWithoutKey(t, l.pool)
	rep, err := testChain.Verify(context.Background(), l.pool)
	testenv.Must(t, err, "verify")
	wantBroken(t, rep, 1, "rehashed without the chain key")
}

// rehashWithoutKey renumbers the chain and recomputes every link with plain SHA-256, as
// the chain was computed before it was keyed: the best an insider without the key can do.
func rehashWithoutKey(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	ctx := context.Background()
	rows, err := pool.Query(ctx, `SELECT stream_seq, subject, type, tenant, event_id, source, occurred_at, request_id, challenge_id,
		payload, pii_digest FROM audit.events ORDER BY chain_pos`)
	testenv.Must(t, err, "read")
	var all []*Row
	for rows.Next() {
		r := &Row{}
		var seq int64
		testenv.Must(t, rows.Scan(&seq, &r.Subject, &r.Type, &r.Tenant, &r.EventID, &r.Source, &r.OccurredAt, &r.RequestID,
			&r.ChallengeID, &r.Payload, &r.PIIDigest), "scan")
		r.StreamSeq = uint64(seq)
		all = append(all, r)
	}
	testenv.Must(t, rows.Err(), "rows")
	prev := make([]byte, 32)
	var sql strings.Builder
	sql.WriteString(`UPDATE audit.events SET chain_pos = -chain_pos`)
	for i, r := range all {
		content, err := rowContent(r)
		testenv.Must(t, err, "content")
		plain := sha256.New() // the chain as it was: SHA-256(prev ‖ content ‖ pii digest)
		plain.Write(prev)
		plain.Write(content)
		plain.Write(r.PIIDigest)
		h := plain.Sum(nil)
		fmt.Fprintf(&sql, `; UPDATE audit.events SET chain_pos = %d, prev_hash = '\x%x', row_hash = '\x%x' WHERE stream_seq = %d`,
			i+1, prev, h, r.StreamSeq)
		prev = h
	}
	fmt.Fprintf(&sql, `; UPDATE audit.chain_head SET pos = %d, hash = '\x%x'`, len(all), prev)
	tamper(t, pool, sql.String())
}

// TestForgedCheckpointOnNATS: someone with publish rights on OTP_AUDIT cannot vouch for a
// rewritten head without the signing key.
func TestForgedCheckpointOnNATS(t *testing.T) {
	l := anchored(t, 20, 0, true)
	forger, err := ParseSigningKey("sig1:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{1}, 32)))
	testenv.Must(t, err, "forger")
	testenv.Must(t, PublishCheckpoint(context.Background(), l.js, forger, Head{Pos: 25, Hash: make([]byte, 32), StreamSeq: 25, KeyID: "c1"}), "publish")
	wantBroken(t, l.verify(t), 25, "no valid signature (forged)")
}

// TestErasureAndPurgeStillVerifyAnchored: the documented changes keep the anchored check
// green: erasure clears personal data only, purge removes a prefix under an authenticated
// checkpoint (signed checkpoints and OTP_EVENTS messages before it are not asked for).
func TestErasureAndPurgeStillVerifyAnchored(t *testing.T) {
	l := anchored(t, 20, 8, true)
	_, err := Erase(context.Background(), testenv.Admin(t, l.pool), testSubjects, "u11@example.com")
	testenv.Must(t, err, "erase")
	n, err := testChain.Purge(context.Background(), l.pool, time.Now().Add(-400*24*time.Hour))
	testenv.Must(t, err, "purge")
	if rep := l.verify(t); n != 8 || !rep.OK() || rep.FirstPos != 9 || rep.Erased != 2 || rep.Events != 12 {
		t.Fatalf("purged %d; report %+v", n, rep)
	}
	// The purge left OTP_EVENTS and the signed checkpoints alone; a signed position past the
	// purge still pins its row.
	tamper(t, l.pool, `UPDATE audit.events SET tenant = 'evil' WHERE chain_pos = 20`)
	wantBroken(t, l.verify(t), 20, "edited")
}

// TestErasedRowCannotCarryForgedPersonalData: an erased row is exempt from the personal
// data digest, so an insider could mark a row erased and write a victim's hash into it,
// pinning the event on them in a trail. An erased row must hold no personal data at all.
func TestErasedRowCannotCarryForgedPersonalData(t *testing.T) {
	l := anchored(t, 20, 0, true)
	victim := []byte(testSubjects.Subject("acme", "victim@example.com"))
	tamper(t, l.pool, fmt.Sprintf(`UPDATE audit.events SET pii_salt = NULL, recipient_hash = '\x%x', recipient_masked = 'v***@example.com',
		pii = '{"client_hash":"%s"}' WHERE chain_pos = 5`, victim, testSubjects.Client("acme", "198.51.100.66")))
	wantBroken(t, l.verify(t), 5, "forged")
}

// TestRowsRewrittenWithAStolenChainKeyDifferFromOTPEvents: an insider who also stole the
// chain key (not the signing key) rewrites a row and rehashes every row after it. The chain
// holds, no checkpoint covers the rows (none were signed), but each row must say what its
// OTP_EVENTS message says.
func TestRowsRewrittenWithAStolenChainKeyDifferFromOTPEvents(t *testing.T) {
	l := anchored(t, 20, 0, false)
	ctx := context.Background()
	rows, err := l.pool.Query(ctx, `SELECT stream_seq, subject, type, tenant, event_id, source, occurred_at, request_id, challenge_id, payload,
		recipient_hash, recipient_masked, pii, pii_salt, pii_digest, chain_pos, prev_hash FROM audit.events WHERE chain_pos >= 10 ORDER BY chain_pos`)
	testenv.Must(t, err, "read")
	var tail []*Row
	for rows.Next() {
		r := &Row{}
		var seq int64
		var pii map[string]string
		testenv.Must(t, rows.Scan(&seq, &r.Subject, &r.Type, &r.Tenant, &r.EventID, &r.Source, &r.OccurredAt, &r.RequestID, &r.ChallengeID,
			&r.Payload, &r.RecipientHash, &r.RecipientMasked, &pii, &r.PIISalt, &r.PIIDigest, &r.ChainPos, &r.PrevHash), "scan")
		r.StreamSeq, r.PII = uint64(seq), pii
		tail = append(tail, r)
	}
	testenv.Must(t, rows.Err(), "rows")
	tail[0].Payload = []byte(`{"challenge_id":"c-9","request_id":"r-9","provider":"evil","attempts":1}`)
	key, err := testChain.key(testChain.KeyID())
	testenv.Must(t, err, "key")
	var sql strings.Builder
	prev := tail[0].PrevHash
	for i, r := range tail {
		h, err := rowHash(key, prev, r)
		testenv.Must(t, err, "hash")
		if i == 0 {
			fmt.Fprintf(&sql, `UPDATE audit.events SET payload = '%s' WHERE chain_pos = %d; `, r.Payload, r.ChainPos)
		}
		fmt.Fprintf(&sql, `UPDATE audit.events SET prev_hash = '\x%x', row_hash = '\x%x' WHERE chain_pos = %d; `, prev, h, r.ChainPos)
		prev = h
	}
	fmt.Fprintf(&sql, `UPDATE audit.chain_head SET hash = '\x%x'`, prev)
	tamper(t, l.pool, sql.String())
	if rep, err := testChain.Verify(ctx, l.pool); err != nil || !rep.OK() {
		t.Fatalf("the table alone should look intact to a key holder: %+v %v", rep, err)
	}
	rep := l.verify(t)
	if rep.OK() || rep.BrokenSeq != 10 || !strings.Contains(rep.Problem, "does not match its") {
		t.Fatalf("report %+v, want the row of stream sequence 10 found forged", rep)
	}
}

// TestEmptiedCheckpointStreamIsNoticed: a NATS admin deletes OTP_AUDIT (deny-delete only
// covers single messages) and the insider cuts the tail of a log written more than a
// minute before: with no signed checkpoint left, verify does not call the log intact. And
// with the auditor's consumer deleted too, verify cannot vouch for OTP_EVENTS and says so.
func TestEmptiedCheckpointStreamIsNoticed(t *testing.T) {
	l := anchored(t, 20, 0, true)
	ctx := context.Background()
	testenv.Must(t, l.js.DeleteStream(ctx, events.StreamAudit), "delete OTP_AUDIT")
	_, err := platform.Provision(ctx, l.js, events.StreamOptions{})
	testenv.Must(t, err, "recreate it empty")
	tamper(t, l.pool, `DELETE FROM audit.events WHERE chain_pos >= 19;
		UPDATE audit.chain_head SET pos = 18, hash = (SELECT row_hash FROM audit.events WHERE chain_pos = 18);
		UPDATE audit.events SET recorded_at = recorded_at - interval '1 hour'`)
	if rep := l.verify(t); rep.OK() || !strings.Contains(rep.Problem, "no signed checkpoint") {
		t.Fatalf("report %+v, want no checkpoint found", rep)
	}

	fresh := anchored(t, 4, 0, true)
	testenv.Must(t, fresh.js.DeleteConsumer(ctx, events.StreamEvents, events.ConsumerAuditor), "delete the consumer")
	if rep, err := testChain.VerifyAnchored(ctx, fresh.pool, fresh.anchors); err == nil {
		t.Fatalf("verify vouched for a log whose auditor consumer is gone: %+v", rep)
	}
}
