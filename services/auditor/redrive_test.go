package auditor

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
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

// TestARedriveChainsTheEventTheAuditorGaveUp: two events the database refused are
// dead-lettered, and the anchored verification reports the first missing from the log.
// The person of the second is then erased. Once the cause is fixed, the operator's
// redrive references get each original chained under its own stream sequence, once:
//   - the first, and the log verifies against the stream again;
//   - the second without its person's hash (it was erased after it, so the log must
//     not learn it back);
//   - a second redrive of the first, and a redrive of an event that was chained all
//     along, add no row but their own;
//   - a reference whose sequence holds another event (a stream recreated, its
//     sequences reused) is refused, and one for another consumer is not the auditor's
//     to follow. Whatever a reference names, the row is made from what the stream holds:
//     an operator cannot get anything chained that is not an OTP_EVENTS message.
//
// Without the auditor's part the anchored verification keeps failing; without the
// erasure check the erased hash is back in the log.
func TestARedriveChainsTheEventTheAuditorGaveUp(t *testing.T) {
	js := poisonEnv(t, 3)
	pool := testenv.Postgres(t, Spec())
	_, err := testenv.Admin(t, pool).Exec(t.Context(),
		`ALTER TABLE audit.events ADD CONSTRAINT test_poison CHECK (request_id NOT LIKE 'poison%')`)
	testenv.Must(t, err, "poison the database")

	person := testSubjects.Subject("acme", "pia@example.com")
	good := publishVerified(t, js, "good-0", "")
	seqA := publishVerified(t, js, "poison-a", "")
	seqB := publishVerified(t, js, "poison-b", fmt.Sprintf(
		`{"challenge_id":"c-b","tenant":"acme","request_id":"poison-b","recipient_hash":%q,"recipient_masked":"p***@example.com"}`, person))
	publishVerified(t, js, "good-1", "")
	reg := startAuditor(t, js, pool)
	testenv.WaitMessages(t, js, events.StreamDLQ, events.TypeDLQ.Wildcard(), 2, 30*time.Second)
	rep, err := testChain.VerifyAnchored(t.Context(), pool, Anchors{JS: js})
	testenv.Must(t, err, "verify anchored")
	if rep.BrokenSeq != int64(seqA) {
		t.Fatalf("before the redrive, anchored verification: %+v, want %d reported missing", rep, seqA)
	}

	// The person of the second is erased; then the cause is fixed.
	erasure, err := events.NewMsg(events.TypeErasureRequested, "acme", "erasure:1", "", events.ErasureRequested{
		ErasureID: uuid.NewString(), Tenant: "acme", RecipientHashes: []string{person},
		Identity: events.OperatorIdentity{User: "ops", Host: "h"}, RequestedAt: time.Now().UTC()}, events.Envelope{Source: "otpflow/cli"})
	testenv.Must(t, err, "erasure")
	_, err = js.PublishMsg(t.Context(), erasure)
	testenv.Must(t, err, "publish erasure")
	testenv.Eventually(t, 30*time.Second, "the erasure answered", func() bool {
		return len(testenv.Messages(t, js, events.StreamEvents, events.TypeErased.Wildcard())) == 1
	})
	_, err = testenv.Admin(t, pool).Exec(t.Context(), `ALTER TABLE audit.events DROP CONSTRAINT test_poison`)
	testenv.Must(t, err, "fix the cause")

	publishRedrive(t, js, 1, seqA, "poison-a", events.ConsumerAuditor)
	publishRedrive(t, js, 2, seqB, "poison-b", events.ConsumerAuditor)
	publishRedrive(t, js, 3, seqA, "poison-a", events.ConsumerAuditor)          // again
	publishRedrive(t, js, 4, good, "good-0", events.ConsumerAuditor)            // chained all along
	publishRedrive(t, js, 5, good, "poison-a", events.ConsumerAuditor)          // another event's sequence
	last := publishRedrive(t, js, 6, seqA, "poison-a", events.ConsumerVerifier) // not the auditor's
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
	if per[fmt.Sprint(seqA)] != "1" || per[fmt.Sprint(seqB)] != "1" {
		t.Errorf("the redriven events' rows: %v (want %d and %d)", per, seqA, seqB)
	}
	if got := column(t, pool, fmt.Sprintf(`SELECT coalesce(convert_from(recipient_hash, 'UTF8'), '-') || ' ' || recipient_masked || ' ' || (pii_salt IS NULL)
		FROM audit.events WHERE stream_seq = %d`, seqB)); len(got) != 1 || got[0] != "-  true" {
		t.Errorf("the erased person's redriven row keeps %q", got)
	}
	if got := column(t, pool, `SELECT count(*) FROM audit.events WHERE type = 'otp.operator_action'`); got[0] != "6" {
		t.Errorf("%s operator rows, want the 6 redrives", got[0])
	}
	rep, err = testChain.Verify(t.Context(), pool)
	testenv.Must(t, err, "verify")
	if !rep.OK() {
		t.Errorf("verify: %+v", rep)
	}
	rep, err = testChain.VerifyAnchored(t.Context(), pool, Anchors{JS: js})
	testenv.Must(t, err, "verify anchored")
	if !rep.OK() {
		t.Errorf("after the redrive, anchored verification: %+v", rep)
	}
	want := map[string]float64{"chained": 2, "already_chained": 2, "refused": 1}
	if got := redriveOutcomes(t, reg); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("redrive outcomes %v, want %v", got, want)
	}
	if n := len(testenv.Messages(t, js, events.StreamDLQ, "")); n != 2 {
		t.Errorf("%d dead letters, want the 2 the test left in place", n)
	}
}
