package auditor

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

func TestEveryEventOnceInStreamOrderWithoutTheAddress(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	key := bytes.Repeat([]byte{7}, 32)
	newSvc := func() *Service {
		s, err := New(Config{RecipientKey: key, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ, BatchSize: 7}, pool, js, testenv.Logger(io.Discard), nil)
		testenv.Must(t, err, "new auditor")
		return s
	}
	// Odd events as this release writes them, even ones as earlier releases did.
	publish := func(i int) {
		e := events.Issued{ChallengeID: fmt.Sprintf("c-%d", i), Tenant: "acme", RequestID: fmt.Sprintf("r-%d", i), CodeSeq: 1,
			RecipientHash: testSubjects.Subject("acme", "ana.lima@example.com"), RecipientMasked: "A***@Example.com",
			Purpose: "login", MaxAttempts: 5, IssuedAt: time.Now().UTC(), ExpiresAt: time.Now().Add(time.Minute).UTC()}
		if i%2 == 0 {
			e = earlierIssued(i)
		}
		m, err := events.NewMsg(events.TypeIssued, "acme", fmt.Sprintf("issued:c-%d:1", i), e.ChallengeID, e, events.Envelope{Source: "test"})
		testenv.Must(t, err, "msg")
		_, err = js.PublishMsg(context.Background(), m)
		testenv.Must(t, err, "publish")
	}
	for i := range 30 {
		publish(i)
	}
	stop := testenv.Start(t, newSvc().Run)
	count := func() (n int) {
		_ = pool.QueryRow(context.Background(), `SELECT count(*) FROM audit.events`).Scan(&n)
		return n
	}
	testenv.Eventually(t, 10*time.Second, "30 rows", func() bool { return count() == 30 })
	stop()

	// Force a full replay of the stream into the same table: rows are keyed by sequence.
	testenv.Must(t, js.DeleteConsumer(context.Background(), events.StreamEvents, events.ConsumerAuditor), "delete consumer")
	_, err := platform.Provision(context.Background(), js, events.StreamOptions{}) // a new consumer, from the start
	testenv.Must(t, err, "provision")
	for i := 30; i < 40; i++ {
		publish(i)
	}
	testenv.Start(t, newSvc().Run)
	testenv.Eventually(t, 10*time.Second, "40 rows", func() bool { return count() == 40 })
	time.Sleep(300 * time.Millisecond)
	if n := count(); n != 40 {
		t.Fatalf("%d rows after a replay, want 40", n)
	}

	rows, err := pool.Query(context.Background(), `SELECT stream_seq, request_id, recipient_hash, recipient_masked, payload::text FROM audit.events ORDER BY stream_seq`)
	testenv.Must(t, err, "query")
	defer rows.Close() // a failure below must not leave the connection busy at cleanup
	i := 0
	for rows.Next() {
		var seq int64
		var req, masked, payload string
		var hash []byte
		testenv.Must(t, rows.Scan(&seq, &req, &hash, &masked, &payload), "scan")
		if seq != int64(i+1) || req != fmt.Sprintf("r-%d", i) {
			t.Fatalf("row %d: seq %d request %s: not in stream order", i, seq, req)
		}
		if string(hash) != testSubjects.Subject("acme", "ana.lima@example.com") || masked != "A***@Example.com" {
			t.Fatalf("recipient kept as %q / %q", hash, masked)
		}
		for _, f := range []string{"ana.lima", `"recipient`, "code_hmac", "pepper_key_id", "session_id", "client_ip", "203.0.113"} {
			if strings.Contains(strings.ToLower(payload), f) {
				t.Fatalf("payload keeps %s: %s", f, payload)
			}
		}
		i++
	}
	if _, err := pool.Exec(context.Background(), `UPDATE audit.events SET tenant = 'x'`); err == nil {
		t.Fatal("the audit log accepted an UPDATE")
	}
	if _, err := pool.Exec(context.Background(), `DELETE FROM audit.events`); err == nil {
		t.Fatal("the audit log accepted a DELETE")
	}
}
