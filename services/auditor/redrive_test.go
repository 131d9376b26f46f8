package auditor

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/prometheus/client_golang/prometheus"
)

// publishRedrive publishes the operator's redrive reference to the event id at stream
// sequence seq, as `otpflow dlq redrive` does, and returns its stream sequence.
func publishRedrive(t *testing.T, js jetstream.JetStream, n int, seq uint64, id, consumer string) uint64 {
	t.Helper()
	ev := events.OperatorAction{Action: events.ActionDLQRedrive, Identity: events.OperatorIdentity{User: "ops", Host: "h"},
		Tenant: "acme", Detail: fmt.Sprintf("redrive %d", n), At: time.Now().UTC(),
		Redrive: &events.RedriveRef{Stream: events.StreamEvents, StreamSeq: seq, EventID: id, Consumer: consumer, DLQSeq: uint64(n)}}
	m, err := events.NewMsg(events.TypeOperatorAction, "acme", fmt.Sprintf("redrive:%d:%s", n, id), "", ev, events.Envelope{Source: "otpflow/cli"})
	testenv.Must(t, err, "redrive %d", n)
	m.Header.Set(events.HeaderRedriveOf, id)
	ack, err := js.PublishMsg(t.Context(), m)
	testenv.Must(t, err, "publish redrive %d", n)
	return ack.Sequence
}

// publishVerifiedAt publishes an otp.verified of request id with event time at, id its
// event id, and returns its stream sequence.
func publishVerifiedAt(t *testing.T, js jetstream.JetStream, id string, at time.Time) uint64 {
	t.Helper()
	m, err := events.NewMsg(events.TypeVerified, "acme", id, "", jsonRaw(fmt.Sprintf(`{"challenge_id":"c-%s","request_id":%q}`, id, id)),
		events.Envelope{Source: "test", Time: at})
	testenv.Must(t, err, "msg %s", id)
	ack, err := js.PublishMsg(t.Context(), m)
	testenv.Must(t, err, "publish %s", id)
	return ack.Sequence
}

// poisonedLog is poisonEnv's stream and a log whose database refuses every event of a
// request id starting with "poison" (fixCause lifts it).
func poisonedLog(t *testing.T) (jetstream.JetStream, *pgxpool.Pool) {
	t.Helper()
	js := poisonEnv(t, 3)
	pool := testenv.Postgres(t, Spec())
	_, err := testenv.Admin(t, pool).Exec(t.Context(), `ALTER TABLE audit.events ADD CONSTRAINT test_poison CHECK (request_id NOT LIKE 'poison%')`)
	testenv.Must(t, err, "poison the database")
	return js, pool
}

// fixCause lifts poisonedLog's refusal.
func fixCause(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	_, err := testenv.Admin(t, pool).Exec(t.Context(), `ALTER TABLE audit.events DROP CONSTRAINT test_poison`)
	testenv.Must(t, err, "fix the cause")
}

// redriveOutcomes reads otpflow_auditor_redrives_total by outcome.
func redriveOutcomes(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather")
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "otpflow_auditor_redrives_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			out[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	return out
}

// TestARedriveChainsTheEventTheAuditorGaveUp: events the database refused are
// dead-lettered, and the anchored verification reports the first missing from the log.
// A person is then erased. Once the cause is fixed, the operator's redrive references get
// each original chained under its own stream sequence, once:
//   - the first, and the log verifies against the stream again;
//   - the person's events without their personal data, as a replay rebuilds them: one
//     with their hash; one that names only their challenge, whose row in the log was
//     erased (its hash is read again from the stream); two of another challenge of
//     theirs, the one with the hash redriven first;
//   - a second redrive of the first, and a redrive of an event that was chained all
//     along, add no row but their own;
//   - refused, with their own rows chained: a reference whose sequence holds another
//     event (a stream recreated, its sequences reused), a dead-lettered erasure request
//     (an erasure is asked again, not done late), and one for another consumer is not
//     the auditor's to follow;
//   - an event the database still refuses: the reference is chained, and the event is
//     back on OTP_DLQ, not lost.
//
// Whatever a reference names, the row is made from what the stream holds: an operator
// cannot get anything chained that is not an OTP_EVENTS message.
func TestARedriveChainsTheEventTheAuditorGaveUp(t *testing.T) {
	js := poisonEnv(t, 3)
	pool := testenv.Postgres(t, Spec())
	_, err := testenv.Admin(t, pool).Exec(t.Context(), `
		ALTER TABLE audit.events ADD CONSTRAINT test_poison CHECK (request_id NOT LIKE 'poison%');
		ALTER TABLE audit.events ADD CONSTRAINT test_stubborn CHECK (request_id <> 'stubborn')`)
	testenv.Must(t, err, "poison the database")

	person := testSubjects.Subject("acme", "pia@example.com")
	client := testSubjects.Client("acme", "203.0.113.7")
	withPerson := func(req, challenge string) string {
		return fmt.Sprintf(`{"challenge_id":%q,"tenant":"acme","request_id":%q,"recipient_hash":%q,"recipient_masked":"p***@example.com"}`,
			challenge, req, person)
	}
	onlyClient := func(req, challenge string) string {
		return fmt.Sprintf(`{"challenge_id":%q,"tenant":"acme","request_id":%q,"client_hash":%q}`, challenge, req, client)
	}
	good := publishVerified(t, js, "good-0", "")
	seqA := publishVerified(t, js, "poison-a", "")
	seqB := publishVerified(t, js, "poison-b", withPerson("poison-b", "c-b"))
	publishVerified(t, js, "good-p", withPerson("good-p", "c-p")) // chained, then erased
	seqC := publishVerified(t, js, "poison-c", onlyClient("poison-c", "c-p"))
	seqX1 := publishVerified(t, js, "poison-x1", withPerson("poison-x1", "c-x"))
	seqX2 := publishVerified(t, js, "poison-x2", onlyClient("poison-x2", "c-x"))
	seqS := publishVerified(t, js, "stubborn", "")
	mkErasure := func(id string, hashes ...string) *nats.Msg {
		m, err := events.NewMsg(events.TypeErasureRequested, "acme", "erasure:"+id, "", events.ErasureRequested{
			ErasureID: uuid.NewString(), Tenant: "acme", RecipientHashes: hashes,
			Identity: events.OperatorIdentity{User: "ops", Host: "h"}, RequestedAt: time.Now().UTC()}, events.Envelope{Source: "otpflow/cli"})
		testenv.Must(t, err, "erasure")
		return m
	}
	refusedErasure := mkErasure("refused", testSubjects.Subject("acme", "zed@example.com"))
	refusedErasure.Data = []byte(strings.Replace(string(refusedErasure.Data), `{`, `{"request_id":"poison-e",`, 1))
	ack, err := js.PublishMsg(t.Context(), refusedErasure)
	testenv.Must(t, err, "publish an erasure the database refuses")
	seqE := ack.Sequence
	publishVerified(t, js, "good-1", "")
	reg := startAuditor(t, js, pool)
	testenv.WaitMessages(t, js, events.StreamDLQ, events.TypeDLQ.Wildcard(), 7, 30*time.Second)
	rep, err := testChain.VerifyAnchored(t.Context(), pool, Anchors{JS: js})
	testenv.Must(t, err, "verify anchored")
	if rep.BrokenSeq != int64(seqA) {
		t.Fatalf("before the redrive, anchored verification: %+v, want %d reported missing", rep, seqA)
	}

	// The person is erased; then the cause is fixed (but for "stubborn").
	_, err = js.PublishMsg(t.Context(), mkErasure("pia", person))
	testenv.Must(t, err, "publish erasure")
	testenv.Eventually(t, 30*time.Second, "the erasure answered", func() bool {
		return len(testenv.Messages(t, js, events.StreamEvents, events.TypeErased.Wildcard())) == 1
	})
	fixCause(t, pool)

	publishRedrive(t, js, 1, seqA, "poison-a", events.ConsumerAuditor)
	publishRedrive(t, js, 2, seqB, "poison-b", events.ConsumerAuditor)
	publishRedrive(t, js, 3, seqC, "poison-c", events.ConsumerAuditor)
	publishRedrive(t, js, 4, seqX1, "poison-x1", events.ConsumerAuditor)
	publishRedrive(t, js, 5, seqX2, "poison-x2", events.ConsumerAuditor)
	publishRedrive(t, js, 6, seqA, "poison-a", events.ConsumerAuditor) // again
	publishRedrive(t, js, 7, good, "good-0", events.ConsumerAuditor)   // chained all along
	publishRedrive(t, js, 8, good, "poison-a", events.ConsumerAuditor) // another event's sequence
	publishRedrive(t, js, 9, seqE, "erasure:refused", events.ConsumerAuditor)
	publishRedrive(t, js, 10, seqA, "poison-a", events.ConsumerVerifier) // not the auditor's
	last := publishRedrive(t, js, 11, seqS, "stubborn", events.ConsumerAuditor)
	testenv.WaitDrained(t, js, events.StreamEvents, events.ConsumerAuditor, last, 30*time.Second)

	// Every sequence once, and the redriven ones under their own.
	per := map[string]string{}
	for _, s := range column(t, pool, `SELECT stream_seq || ':' || count(*) FROM audit.events GROUP BY stream_seq`) {
		k, v, _ := strings.Cut(s, ":")
		per[k] = v
	}
	for seq, n := range per {
		if n != "1" {
			t.Errorf("stream sequence %s has %s rows", seq, n)
		}
	}
	for _, seq := range []uint64{seqA, seqB, seqC, seqX1, seqX2} {
		if per[fmt.Sprint(seq)] != "1" {
			t.Errorf("the redriven event at %d has no row: %v", seq, per)
		}
	}
	for _, seq := range []uint64{seqE, seqS} {
		if per[fmt.Sprint(seq)] != "" {
			t.Errorf("the refused event at %d has a row", seq)
		}
	}
	for _, seq := range []uint64{seqB, seqC, seqX1, seqX2} {
		if got := column(t, pool, fmt.Sprintf(`SELECT coalesce(convert_from(recipient_hash, 'UTF8'), '-') || ' ' || recipient_masked || ' ' || coalesce(pii::text, '-')
			FROM audit.events WHERE stream_seq = %d`, seq)); len(got) != 1 || got[0] != "-  -" {
			t.Errorf("the erased person's redriven row at %d keeps %q", seq, got)
		}
	}
	if got := column(t, pool, `SELECT count(*) FROM audit.events WHERE type = 'otp.operator_action'`); got[0] != "11" {
		t.Errorf("%s operator rows, want the 11 redrives", got[0])
	}
	rep, err = testChain.Verify(t.Context(), pool)
	testenv.Must(t, err, "verify")
	if !rep.OK() {
		t.Errorf("verify: %+v", rep)
	}
	// What is left missing is the event the database still refuses.
	rep, err = testChain.VerifyAnchored(t.Context(), pool, Anchors{JS: js})
	testenv.Must(t, err, "verify anchored")
	if rep.BrokenSeq != int64(seqS) {
		t.Errorf("after the redrive, anchored verification: %+v, want only %d missing", rep, seqS)
	}
	want := map[string]float64{"chained": 5, "already_chained": 2, "refused": 3}
	if got := redriveOutcomes(t, reg); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("redrive outcomes %v, want %v", got, want)
	}
	// The erasure request and the stubborn event are back on OTP_DLQ, with why, beside
	// the 7 first dead letters the test left in place: a redrive loses nothing.
	dls := testenv.Messages(t, js, events.StreamDLQ, "")
	if len(dls) != 9 {
		t.Fatalf("%d dead letters, want 9", len(dls))
	}
	for i, want := range []struct {
		id, seq, reason string
	}{{"erasure:refused", fmt.Sprint(seqE), "an erasure request is not chained late"}, {"stubborn", fmt.Sprint(seqS), "refused by the database again"}} {
		back := dls[7+i]
		if orig := testenv.OpenDeadLetter(t, testDLQ, back); nats.Header(orig.Header).Get(events.HeaderID) != want.id ||
			back.Header.Get(events.HeaderDLQSequence) != want.seq || !strings.Contains(back.Header.Get(events.HeaderDLQReason), want.reason) {
			t.Errorf("back on OTP_DLQ: %v, want %s", back.Header, want.id)
		}
	}
}

// TestARedriveDoesNotBringBackWhatAPurgeCut: an event the auditor gave up, before the
// highest stream sequence a purge by age has since cut from the log, is not chained by a
// redrive: the log keeps nothing from before there, and the anchored verification asks
// nothing from there.
func TestARedriveDoesNotBringBackWhatAPurgeCut(t *testing.T) {
	js, pool := poisonedLog(t)
	old := time.Now().Add(-400 * 24 * time.Hour)
	publishAt := func(id string, at time.Time) uint64 { return publishVerifiedAt(t, js, id, at) }
	publishAt("old-0", old)
	seqOld := publishAt("poison-old", old)
	publishAt("old-2", old)
	publishAt("new-0", time.Now())
	reg := startAuditor(t, js, pool)
	testenv.WaitMessages(t, js, events.StreamDLQ, events.TypeDLQ.Wildcard(), 1, 30*time.Second)
	testenv.Eventually(t, 30*time.Second, "the other three chained", func() bool { return len(chainedSeqs(t, pool)) == 3 })
	n, err := testChain.Purge(t.Context(), pool, time.Now().Add(-365*24*time.Hour))
	testenv.Must(t, err, "purge")
	if n != 2 {
		t.Fatalf("purged %d rows, want old-0's and old-2's", n)
	}
	fixCause(t, pool)

	last := publishRedrive(t, js, 1, seqOld, "poison-old", events.ConsumerAuditor)
	testenv.WaitDrained(t, js, events.StreamEvents, events.ConsumerAuditor, last, 30*time.Second)
	if got := column(t, pool, fmt.Sprintf(`SELECT count(*) FROM audit.events WHERE stream_seq = %d`, seqOld)); got[0] != "0" {
		t.Errorf("the event from before the purge was chained by the redrive")
	}
	if got := redriveOutcomes(t, reg); got["refused"] != 1 || got["chained"] != 0 {
		t.Errorf("redrive outcomes %v", got)
	}
	rep, err := testChain.VerifyAnchored(t.Context(), pool, Anchors{JS: js})
	testenv.Must(t, err, "verify anchored")
	if !rep.OK() {
		t.Errorf("anchored verification: %+v", rep)
	}
}

// TestARedrivenRowOutlivesAPurgeOfItsNeighbours: an old event is redriven, so its row is
// chained after newer ones; a purge by age then cuts the old rows chained before the new,
// and leaves the redriven one. The anchored verification still asks the stream only for
// what follows the purge (it does not take the redriven row's low sequence for where the
// log starts, which would report the purged neighbours deleted), and an event the auditor
// gave up just after the last one the purge cut is still chained by a redrive.
func TestARedrivenRowOutlivesAPurgeOfItsNeighbours(t *testing.T) {
	js, pool := poisonedLog(t)
	old := time.Now().Add(-400 * 24 * time.Hour)
	publishAt := func(id string, at time.Time) uint64 { return publishVerifiedAt(t, js, id, at) }
	publishAt("old-0", old)
	seqPoison := publishAt("poison-1", old)
	publishAt("old-2", old)
	seqOld3 := publishAt("poison-3", old)
	publishAt("new-4", time.Now())
	reg := startAuditor(t, js, pool)
	testenv.WaitMessages(t, js, events.StreamDLQ, events.TypeDLQ.Wildcard(), 2, 30*time.Second)
	testenv.Eventually(t, 30*time.Second, "the other three chained", func() bool { return len(chainedSeqs(t, pool)) == 3 })
	fixCause(t, pool)
	last := publishRedrive(t, js, 1, seqPoison, "poison-1", events.ConsumerAuditor)
	testenv.WaitDrained(t, js, events.StreamEvents, events.ConsumerAuditor, last, 30*time.Second)

	n, err := testChain.Purge(t.Context(), pool, time.Now().Add(-365*24*time.Hour))
	testenv.Must(t, err, "purge")
	if got := chainedSeqs(t, pool); n != 2 || len(got) != 3 || got[1] != seqPoison {
		t.Fatalf("purged %d rows, left %v: want old-0 and old-2 gone, the redriven row after new-4", n, got)
	}
	// What is reported missing is the event still on OTP_DLQ, not the purged ones.
	rep, err := testChain.VerifyAnchored(t.Context(), pool, Anchors{JS: js})
	testenv.Must(t, err, "verify anchored")
	if rep.BrokenSeq != int64(seqOld3) {
		t.Errorf("anchored verification after the purge: %+v, want only %d missing", rep, seqOld3)
	}
	last = publishRedrive(t, js, 2, seqOld3, "poison-3", events.ConsumerAuditor)
	testenv.WaitDrained(t, js, events.StreamEvents, events.ConsumerAuditor, last, 30*time.Second)
	if got := column(t, pool, fmt.Sprintf(`SELECT count(*) FROM audit.events WHERE stream_seq = %d`, seqOld3)); got[0] != "1" {
		t.Errorf("the event after the purge was not chained by its redrive")
	}
	if got := redriveOutcomes(t, reg); got["chained"] != 2 || got["refused"] != 0 {
		t.Errorf("redrive outcomes %v", got)
	}
	rep, err = testChain.VerifyAnchored(t.Context(), pool, Anchors{JS: js})
	testenv.Must(t, err, "verify anchored")
	if !rep.OK() {
		t.Errorf("anchored verification after the second redrive: %+v", rep)
	}
}
