package auditor

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

var testKey = bytes.Repeat([]byte{7}, 32)

// testSubjects is the OTP_SUBJECT_KEY ring of the tests.
var testSubjects = func() *keys.Subjects {
	s, err := keys.ParseSubjects("k1:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{6}, 32)))
	if err != nil {
		panic(err)
	}
	return s
}()

// testChain keys the test chains; the database never sees it.
var testChain = func() *Chain {
	c, err := ParseChainKey("c1:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{8}, 32)))
	if err != nil {
		panic(err)
	}
	return c
}()

// testDLQ is the OTP_DLQ_KEY of the test auditors.
var testDLQ = func() *keys.Sealer {
	s, err := keys.ParseSealer("d1:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{10}, 32)))
	if err != nil {
		panic(err)
	}
	return s
}()

// seed writes n issued/delivered events through Append, as the auditor's role on a fresh
// database, and returns the pool.
func seed(t *testing.T, n int) *pgxpool.Pool {
	t.Helper()
	pool := testenv.Postgres(t, Spec())
	seedOn(t, pool, n)
	return pool
}

// seedOn writes n issued/delivered events through Append on pool.
func seedOn(t *testing.T, pool *pgxpool.Pool, n int) {
	t.Helper()
	var rows []*Row
	for i := 1; i <= n; i++ {
		typ, body := events.TypeIssued, fmt.Sprintf(`{"challenge_id":"c-%d","request_id":"r-%d","recipient":"u%d@example.com","client_ip":"203.0.113.%d","code_seq":1,"max_attempts":5}`, i, i, i, i)
		if i%2 == 0 {
			typ, body = events.TypeDelivered, fmt.Sprintf(`{"challenge_id":"c-%d","request_id":"r-%d","provider":"ses","attempts":1}`, i-1, i-1)
		}
		m, err := events.NewMsg(typ, "acme", fmt.Sprintf("e-%d", i), "", jsonRaw(body), events.Envelope{Source: "test", Time: time.Now()})
		testenv.Must(t, err, "msg")
		r, err := ToRow(testKey, testSubjects, uint64(i), time.Now(), m.Subject, m.Header, m.Data)
		testenv.Must(t, err, "row")
		rows = append(rows, &r)
	}
	if _, err := testChain.Append(context.Background(), pool, rows[:n/2]); err != nil {
		t.Fatal(err)
	}
	if _, err := testChain.Append(context.Background(), pool, rows); err != nil { // overlapping: the first half is skipped
		t.Fatal(err)
	}
}

type jsonRaw string

func (j jsonRaw) MarshalJSON() ([]byte, error) { return []byte(j), nil }

// tamper runs sql on pool's database as a superuser with the append-only trigger
// bypassed, as an attacker with full database access could.
func tamper(t *testing.T, pool *pgxpool.Pool, sql string) {
	t.Helper()
	ctx := context.Background()
	conn, err := testenv.Admin(t, pool).Acquire(ctx)
	testenv.Must(t, err, "acquire")
	defer conn.Release()
	_, err = conn.Exec(ctx, "SET session_replication_role = replica; "+sql+"; SET session_replication_role = origin")
	testenv.Must(t, err, "tamper: %s", sql)
}

func TestVerifyIntactChain(t *testing.T) {
	pool := seed(t, 20)
	rep, err := testChain.Verify(context.Background(), pool)
	testenv.Must(t, err, "verify")
	if !rep.OK() || rep.Rows != 20 || rep.FirstPos != 1 || rep.LastPos != 20 {
		t.Fatalf("report %+v", rep)
	}
}

func TestVerifyCatchesTampering(t *testing.T) {
	tests := []struct {
		name, sql string
		pos       int64
		problem   string
	}{
		{"edited payload", `UPDATE audit.events SET payload = jsonb_set(payload, '{provider}', '"smtp"') WHERE chain_pos = 8`, 8, "edited"},
		{"edited time", `UPDATE audit.events SET occurred_at = occurred_at - interval '1 hour' WHERE chain_pos = 5`, 5, "edited"},
		{"edited personal data", `UPDATE audit.events SET recipient_masked = 'x***@example.com' WHERE chain_pos = 3`, 3, "personal data"},
		{"deleted row", `DELETE FROM audit.events WHERE chain_pos = 11`, 12, "deleted"},
		{"deleted last rows", `DELETE FROM audit.events WHERE chain_pos >= 19`, 19, "deleted at the end"},
		{"inserted row", `INSERT INTO audit.events (stream_seq, subject, type, tenant, event_id, source, occurred_at, payload)
			VALUES (999, 'otp.verified.acme', 'otp.verified', 'acme', 'x', 'evil', now(), '{}')`, 0, "inserted"},
		{"inserted into the chain", `UPDATE audit.events SET chain_pos = -(chain_pos + 1) WHERE chain_pos >= 15;
			UPDATE audit.events SET chain_pos = -chain_pos WHERE chain_pos < 0;
			INSERT INTO audit.events (stream_seq, subject, type, tenant, event_id, source, occurred_at, payload, chain_pos, prev_hash, row_hash, pii_digest)
			SELECT 999, subject, type, tenant, 'x', 'evil', occurred_at, payload, 15, prev_hash, row_hash, pii_digest FROM audit.events WHERE chain_pos = 14`, 15, "inserted"},
		{"swapped rows", `UPDATE audit.events SET chain_pos = -1 WHERE chain_pos = 6; UPDATE audit.events SET chain_pos = 6 WHERE chain_pos = 7;
			UPDATE audit.events SET chain_pos = 7 WHERE chain_pos = -1`, 6, "inserted or reordered"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pool := seed(t, 20)
			tamper(t, pool, tc.sql)
			rep, err := testChain.Verify(context.Background(), pool)
			testenv.Must(t, err, "verify")
			if rep.OK() || rep.BrokenPos != tc.pos || !strings.Contains(rep.Problem, tc.problem) {
				t.Fatalf("report %+v, want broken at %d (%s)", rep, tc.pos, tc.problem)
			}
		})
	}
}

func TestAppendOnlyTrigger(t *testing.T) {
	pool := seed(t, 4)
	for _, sql := range []string{
		`UPDATE audit.events SET tenant = 'x' WHERE chain_pos = 1`,
		`UPDATE audit.events SET row_hash = '\x00' WHERE chain_pos = 1`,
		`DELETE FROM audit.events WHERE chain_pos = 1`,
	} {
		if _, err := pool.Exec(context.Background(), sql); err == nil {
			t.Errorf("accepted: %s", sql)
		}
	}
}

func TestErasureKeepsTheChainVerifiable(t *testing.T) {
	pool := seed(t, 20)
	n, err := Erase(context.Background(), testenv.Admin(t, pool), testSubjects, "U5@example.com")
	testenv.Must(t, err, "erase")
	if n != 2 { // the issued row and the delivered row of its challenge
		t.Fatalf("erased %d rows, want 2", n)
	}
	var left int
	testenv.Must(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM audit.events WHERE recipient_masked LIKE 'u***%'`).Scan(&left), "count")
	var erasedIP int
	testenv.Must(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM audit.events WHERE pii->>'client_hash' = $1`,
		testSubjects.Client("acme", "203.0.113.5")).Scan(&erasedIP), "count")
	if erasedIP != 0 || left != 9 {
		t.Fatalf("after erasure: %d rows still hold the IP, %d masked addresses of others left (want 0 and 9)", erasedIP, left)
	}
	rep, err := testChain.Verify(context.Background(), pool)
	testenv.Must(t, err, "verify")
	if !rep.OK() || rep.Erased != 2 {
		t.Fatalf("report %+v", rep)
	}
}

func TestPurgeByAgeKeepsTheRestVerifiable(t *testing.T) {
	pool := seed(t, 20)
	tamper(t, pool, `UPDATE audit.events SET occurred_at = occurred_at - interval '400 days' WHERE chain_pos <= 8`)
	// The tamper above broke rows 1-8; purge removes exactly those (older than 365 days).
	n, err := testChain.Purge(context.Background(), pool, time.Now().Add(-365*24*time.Hour))
	testenv.Must(t, err, "purge")
	rep, err := testChain.Verify(context.Background(), pool)
	testenv.Must(t, err, "verify")
	if n != 8 || !rep.OK() || rep.FirstPos != 9 || rep.Rows != 12 {
		t.Fatalf("purged %d; report %+v", n, rep)
	}
}

// TestBackfillChainsLegacyRows: rows written before the chain existed are chained at
// start, and the log then verifies.
func TestBackfillChainsLegacyRows(t *testing.T) {
	// A log written before the chain existed: rows without a chain position.
	pool := seed(t, 0)
	tamper(t, pool, `INSERT INTO audit.events (stream_seq, subject, type, tenant, event_id, source, occurred_at, payload, recipient_hash, recipient_masked)
		VALUES (100, 'otp.issued.acme', 'otp.issued', 'acme', 'old-1', 'otpflow/issuer', now(), '{"request_id":"old"}', '\x01', 'o***@example.com'),
		       (101, 'otp.verified.acme', 'otp.verified', 'acme', 'old-2', 'otpflow/verifier', now(), '{"request_id":"old"}', NULL, '')`)
	if rep, _ := testChain.Verify(context.Background(), pool); rep.OK() {
		t.Fatal("unchained rows passed verification")
	}
	n, err := testChain.Backfill(context.Background(), pool, testKey)
	testenv.Must(t, err, "backfill")
	rep, err := testChain.Verify(context.Background(), pool)
	testenv.Must(t, err, "verify")
	if n != 2 || !rep.OK() || rep.Rows != 2 {
		t.Fatalf("backfilled %d; report %+v", n, rep)
	}
}

// TestBackfillRefusesRowsInsertedIntoAChainedLog: once the chain has begun, an unchained
// row can only have been inserted behind the auditor's back; chaining it at the next start
// would launder it under the real key. Backfill refuses, and so does Append when such a
// row sits where its next message belongs.
func TestBackfillRefusesRowsInsertedIntoAChainedLog(t *testing.T) {
	pool := seed(t, 6)
	tamper(t, pool, `INSERT INTO audit.events (stream_seq, subject, type, tenant, event_id, source, occurred_at, payload, recipient_hash, recipient_masked)
		VALUES (100, 'otp.verified.acme', 'otp.verified', 'acme', 'evil-1', 'evil', now(), '{"request_id":"victim"}', NULL, '')`)
	if _, err := testChain.Backfill(context.Background(), pool, testKey); err == nil {
		t.Fatal("backfill chained a row inserted into a chained log")
	}
	r := &Row{StreamSeq: 100, Subject: "otp.verified.acme", Type: "otp.verified", Tenant: "acme", EventID: "real-100", Source: "otpflow/verifier",
		OccurredAt: time.Now().UTC().Truncate(time.Microsecond), Payload: []byte(`{"request_id":"real"}`)}
	if _, err := testChain.Append(context.Background(), pool, []*Row{r}); err == nil {
		t.Fatal("append passed over a row written outside the auditor")
	}
}
