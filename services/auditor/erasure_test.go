package auditor

import (
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestErasureWaitsForEarlierEvents: an auditor that chains the erasure of a person before
// an earlier event about them (a batch redelivered after a crash, or another auditor's)
// does not erase yet: it fails, to be retried, naming the event it waits for; once that
// event is written and acknowledged, the erasure clears it too. An alert naming the
// person by subject hash is erased with their rows.
func TestErasureWaitsForEarlierEvents(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	svc, err := New(Config{RecipientKey: testKey, Chain: testChain, Subjects: testSubjects, DLQKey: testDLQ}, pool, js,
		testenv.Logger(io.Discard), nil)
	testenv.Must(t, err, "new auditor")
	ana := testSubjects.Subject("acme", "ana@example.com")
	publish := func(typ events.Type, id string, v any) *jetstream.PubAck {
		m, err := events.NewMsg(typ, "acme", id, "", v, events.Envelope{Source: "test"})
		testenv.Must(t, err, "msg")
		ack, err := js.PublishMsg(context.Background(), m)
		testenv.Must(t, err, "publish")
		return ack
	}
	publish(events.TypeIssued, "issued:c1:1", events.Issued{ChallengeID: "c1", Tenant: "acme", RequestID: "r1", CodeSeq: 1,
		RecipientHash: ana, RecipientMasked: "a***@example.com", Purpose: "login", IssuedAt: time.Now().UTC()})
	publish(events.TypeAlert, "alert:1", events.Alert{Tenant: "acme", Rule: RuleVerifyFailuresRecipient, Detail: "3 failed verifications",
		SubjectHash: ana, RaisedAt: time.Now().UTC()})
	publish(events.TypeErasureRequested, "erasure:1", events.ErasureRequested{ErasureID: "5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6",
		Tenant: "acme", RecipientHashes: testSubjects.SubjectHashes("acme", "ana@example.com"), RequestedAt: time.Now().UTC()})

	cons, err := platform.Bind(context.Background(), js, events.StreamEvents, events.AuditorConsumer)
	testenv.Must(t, err, "bind")
	svc.cons = cons
	batch, err := cons.Fetch(3, jetstream.FetchMaxWait(5*time.Second))
	testenv.Must(t, err, "fetch")
	var msgs []jetstream.Msg
	for m := range batch.Messages() {
		msgs = append(msgs, m)
	}
	if len(msgs) != 3 {
		t.Fatalf("fetched %d", len(msgs))
	}
	row := func(m jetstream.Msg) *Row {
		md, err := m.Metadata()
		testenv.Must(t, err, "metadata")
		r, err := ToRow(testKey, testSubjects, md.Sequence.Stream, md.Timestamp, m.Subject(), m.Headers(), m.Data())
		testenv.Must(t, err, "row")
		return &r
	}
	// The erasure is chained first; the events before it are not in the log yet.
	late := []*Row{row(msgs[2])}
	_, err = testChain.Append(context.Background(), pool, late)
	testenv.Must(t, err, "append the erasure")
	err = svc.eraseChained(context.Background(), late)
	if err == nil || !strings.Contains(err.Error(), "waits for the event at 1") {
		t.Fatalf("erasure ahead of the events before it: %v", err)
	}
	if answers := testenv.Messages(t, js, events.StreamEvents, events.TypeErased.Wildcard()); len(answers) != 0 {
		t.Fatalf("answered before erasing: %d", len(answers))
	}

	// The redelivered events are written and acknowledged; the retried erasure clears them.
	early := []*Row{row(msgs[0]), row(msgs[1])}
	_, err = testChain.Append(context.Background(), pool, early)
	testenv.Must(t, err, "append the events")
	for _, m := range msgs[:2] {
		testenv.Must(t, m.DoubleAck(context.Background()), "ack")
	}
	testenv.Must(t, svc.eraseChained(context.Background(), late), "erase")
	// Only the erasure's own record names the person (by hash, on purpose).
	var left int
	testenv.Must(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM audit.events WHERE stream_seq < 3 AND
		(recipient_hash IS NOT NULL OR recipient_masked <> '' OR pii IS NOT NULL OR payload::text LIKE '%' || $1 || '%')`,
		strings.SplitN(ana, ":", 2)[1]).Scan(&left), "count")
	if left != 0 {
		t.Fatalf("%d rows before the erasure still name the person", left)
	}
	answers := testenv.Messages(t, js, events.StreamEvents, events.TypeErased.Wildcard())
	var e events.Erased
	if len(answers) != 1 || json.Unmarshal(answers[0].Data, &e) != nil || e.Rows != 2 || e.Service != "auditor" {
		t.Fatalf("answers: %d, %+v", len(answers), e)
	}
	if rep, err := testChain.Verify(context.Background(), pool); err != nil || rep.Problem != "" || rep.Erased != 2 {
		t.Fatalf("verify after the erasure: %+v, %v", rep, err)
	}
}
