package verifier

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// mixedBatch publishes, after a victim challenge of tenant acme and a challenge to
// supersede, a batch of good and hostile events. It returns what each one should become.
type mixedBatch struct {
	victim, superseded, good1, good2 string
	// dlq maps each event that must be dead-lettered to a piece of its reason.
	dlq map[string]string
}

const (
	victimCode   = "481516"
	attackerCode = "999999"
)

// publishEvent publishes v as typ on subject typ.<subjectTenant>.
func publishEvent(t *testing.T, js jetstream.JetStream, typ events.Type, subjectTenant, id, challenge string, v any) {
	t.Helper()
	m, err := events.NewMsg(typ, subjectTenant, id, challenge, v, events.Envelope{Source: "test"})
	testenv.Must(t, err, "msg %s", id)
	_, err = js.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish %s", id)
}

func challengeFor(t *testing.T, pepper *keys.Pepper, tenant, challenge, requestID string, seq int, code string) events.Challenge {
	t.Helper()
	mac, err := pepper.MAC("p1", challenge, code)
	testenv.Must(t, err, "mac")
	return events.Challenge{ChallengeID: challenge, Tenant: tenant, RequestID: requestID, CodeSeq: seq,
		CodeLength: 6, CodeHMAC: mac, PepperKeyID: "p1", MaxAttempts: 5, RecipientHashes: []string{"k1:" + requestID},
		IssuedAt: time.Now().UTC(), ExpiresAt: time.Now().Add(10 * time.Minute).UTC()}
}

// publishSetup publishes the victim and the challenge to supersede (both acme).
func publishSetup(t *testing.T, js jetstream.JetStream, pepper *keys.Pepper) mixedBatch {
	t.Helper()
	b := mixedBatch{victim: ch(60), superseded: ch(61), good1: ch(62), good2: ch(63)}
	publishEvent(t, js, events.TypeChallenge, "acme", "victim", b.victim, challengeFor(t, pepper, "acme", b.victim, "victim", 1, victimCode))
	publishEvent(t, js, events.TypeChallenge, "acme", "old", b.superseded, challengeFor(t, pepper, "acme", b.superseded, "old", 1, "123123"))
	return b
}

// publishMixed publishes the hostile batch.
func (b *mixedBatch) publishMixed(t *testing.T, js jetstream.JetStream, pepper *keys.Pepper) {
	t.Helper()
	at := time.Now().UTC()
	b.dlq = map[string]string{}
	publishEvent(t, js, events.TypeChallenge, "acme", "good1", b.good1, challengeFor(t, pepper, "acme", b.good1, "good1", 1, "111111"))

	// A superseded event on tenant beta's subject whose body claims acme and names acme's
	// live challenge: refused on the tenant, like an otp.issued.
	publishEvent(t, js, events.TypeChallengeSuperseded, "beta", "cross-tenant", b.victim, events.Superseded{
		ChallengeID: b.victim, Tenant: "acme", RequestID: "victim", SupersededBy: "x", SupersededAt: at})
	b.dlq["cross-tenant"] = "tenant"
	// A consistent beta event naming acme's challenge: not dead-lettered (it names nothing
	// beta has), and it must not touch acme's row.
	publishEvent(t, js, events.TypeChallengeSuperseded, "beta", "beta-names-acme", b.victim, events.Superseded{
		ChallengeID: b.victim, Tenant: "beta", RequestID: "victim", SupersededBy: "x", SupersededAt: at})
	// Challenge ids that are not UUIDs: once a database error that held back the batch.
	bad := challengeFor(t, pepper, "acme", "not-a-uuid", "bad-id", 1, "222222")
	publishEvent(t, js, events.TypeChallenge, "acme", "not-a-uuid", "not-a-uuid", bad)
	b.dlq["not-a-uuid"] = "challenge_id"
	publishEvent(t, js, events.TypeChallengeSuperseded, "acme", "superseded-not-a-uuid", "", events.Superseded{
		ChallengeID: "NOT-A-UUID", Tenant: "acme", RequestID: "old", SupersededBy: "x", SupersededAt: at})
	b.dlq["superseded-not-a-uuid"] = "challenge_id"
	// Tenant beta issuing a second code of its own choosing into acme's challenge.
	publishEvent(t, js, events.TypeChallenge, "beta", "hijack", b.victim, challengeFor(t, pepper, "beta", b.victim, "hijack", 2, attackerCode))
	b.dlq["hijack"] = "belongs to another request"
	// Well-formed, but the database refuses it (a constraint the test adds).
	publishEvent(t, js, events.TypeChallenge, "acme", "poison", ch(64), challengeFor(t, pepper, "acme", ch(64), "poison", 1, "333333"))
	b.dlq["poison"] = "database refused"

	publishEvent(t, js, events.TypeChallengeSuperseded, "acme", "supersede-old", b.superseded, events.Superseded{
		ChallengeID: b.superseded, Tenant: "acme", RequestID: "old", SupersededBy: "good1", SupersededAt: at})
	publishEvent(t, js, events.TypeChallenge, "beta", "good2", b.good2, challengeFor(t, pepper, "beta", b.good2, "good2", 1, "444444"))
}

// poisonConstraint makes the database refuse the challenge of request "poison".
func poisonConstraint(t *testing.T, h *harness) {
	t.Helper()
	// DDL is the owner's: the test adds it as the administrator (the verifier's role cannot).
	_, err := testenv.Admin(t, h.pool).Exec(t.Context(), `ALTER TABLE verifier.challenges ADD CONSTRAINT test_poison CHECK (request_id <> 'poison')`)
	testenv.Must(t, err, "add constraint")
}

// check asserts the outcome of the mixed batch: the good events projected, the bad ones
// on OTP_DLQ with their reasons, the victim untouched and still verifiable.
func (b *mixedBatch) check(t *testing.T, h *harness, verify func(tenant, requestID, code string) events.VerifyReply) {
	t.Helper()
	for _, c := range []struct{ challenge, tenant, status string }{
		{b.good1, "acme", "active"}, {b.good2, "beta", "active"}, {b.superseded, "acme", "superseded"}, {b.victim, "acme", "active"},
	} {
		var tenant, status string
		err := h.pool.QueryRow(t.Context(), `SELECT tenant, status FROM verifier.challenges WHERE challenge_id = $1`, c.challenge).Scan(&tenant, &status)
		testenv.Must(t, err, "challenge %s", c.challenge)
		if tenant != c.tenant || status != c.status {
			t.Errorf("challenge %s: tenant %s status %s, want %s %s", c.challenge, tenant, status, c.tenant, c.status)
		}
	}
	var n int
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT count(*) FROM verifier.codes WHERE challenge_id = $1`, b.victim).Scan(&n), "codes")
	if n != 1 {
		t.Errorf("the victim has %d codes, want its own one", n)
	}
	testenv.Must(t, h.pool.QueryRow(t.Context(), `SELECT count(*) FROM verifier.challenges WHERE request_id IN ('poison', 'hijack', 'bad-id')`).Scan(&n), "refused")
	if n != 0 {
		t.Errorf("%d refused challenges projected", n)
	}

	dl := testenv.WaitMessages(t, h.js, events.StreamDLQ, events.TypeDLQ.Wildcard(), len(b.dlq), 10*time.Second)
	got := map[string]string{}
	ceID := func(m *jetstream.RawStreamMsg) string {
		return nats.Header(testenv.OpenDeadLetter(t, h.dlq, m).Header).Get("ce-id")
	}
	for _, m := range dl {
		got[ceID(m)] = m.Header.Get(events.HeaderDLQReason)
	}
	if len(dl) != len(b.dlq) {
		t.Errorf("%d dead letters %v, want %d", len(dl), got, len(b.dlq))
	}
	for _, m := range dl {
		reason := m.Header.Get(events.HeaderDLQReason)
		id := ceID(m)
		want, ok := b.dlq[id]
		if !ok || !strings.Contains(reason, want) {
			t.Errorf("dead letter %q with reason %q, want one of %v", id, reason, b.dlq)
		}
		if m.Header.Get(events.HeaderDLQStream) != events.StreamChallenges {
			t.Errorf("dead letter %q: origin %q", id, m.Header.Get(events.HeaderDLQStream))
		}
	}

	if r := verify("acme", "victim", attackerCode); r.Status != events.StatusInvalidCode {
		t.Errorf("the code beta tried to plant: %+v, want invalid_code", r)
	}
	if r := verify("acme", "victim", victimCode); r.Status != events.StatusVerified {
		t.Errorf("the victim's own code: %+v, want verified", r)
	}
	if r := verify("acme", "good1", "111111"); r.Status != events.StatusVerified {
		t.Errorf("good1: %+v", r)
	}
}

// TestProjectionChecksEventsInOneBatch hands the projection one batch of good and
// hostile events: the good ones are projected in it, each hostile one goes to OTP_DLQ with
// its reason, and nothing is left unsettled for redelivery.
func TestProjectionChecksEventsInOneBatch(t *testing.T) {
	nc, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, Spec())
	pepper, err := keys.ParsePepper(keys.Generate("p1", 32))
	testenv.Must(t, err, "pepper")
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subject key")
	dlq := testenv.DLQKey(t)
	svc, err := New(Config{Pepper: pepper, Subjects: subjects, DLQKey: dlq}, pool, nc, js, testenv.Logger(io.Discard), nil)
	testenv.Must(t, err, "verifier")
	h := &harness{nc: nc, js: js, pool: pool, pepper: pepper, subjects: subjects, dlq: dlq, svc: svc}
	poisonConstraint(t, h)

	cfg := events.VerifierConsumer
	cfg.Durable = "batch_test"
	cons, err := js.CreateOrUpdateConsumer(t.Context(), events.StreamChallenges, cfg)
	testenv.Must(t, err, "consumer")
	fetch := func(n int) []jetstream.Msg {
		t.Helper()
		batch, err := cons.Fetch(n, jetstream.FetchMaxWait(5*time.Second))
		testenv.Must(t, err, "fetch")
		var msgs []jetstream.Msg
		for m := range batch.Messages() {
			msgs = append(msgs, m)
		}
		if len(msgs) != n {
			t.Fatalf("fetched %d messages, want %d in one batch", len(msgs), n)
		}
		return msgs
	}

	c := platform.NewConsumer(cons, platform.ConsumeConfig{Name: cfg.Durable, JS: js, Log: testenv.Logger(io.Discard),
		DeadLetters: &platform.DeadLetters{Sealer: dlq, Recipient: platform.EventRecipient(subjects)}})
	b := publishSetup(t, js, pepper)
	c.Handle(t.Context(), fetch(2), svc.project)
	b.publishMixed(t, js, pepper)
	c.Handle(t.Context(), fetch(9), svc.project)

	// Acks and terms are not confirmed by the server, hence the wait; a nak would keep
	// an event pending until its redelivery.
	testenv.Eventually(t, 5*time.Second, "every event of the batch settled", func() bool {
		info, err := cons.Info(t.Context())
		return err == nil && info.NumAckPending == 0 && info.NumPending == 0
	})
	b.check(t, h, func(tenant, requestID, code string) events.VerifyReply {
		r, err := svc.Verify(t.Context(), tenant, events.VerifyRequest{RequestID: requestID, Code: code})
		testenv.Must(t, err, "verify")
		return r
	})
}

// TestProjectionKeepsConsumingPastBadEvents: the same mixed events through the running
// verifier. Its consumer does not stall: the good events are projected, the bad ones
// dead-lettered, nothing waits for redelivery, and the victim verifies over NATS.
func TestProjectionKeepsConsumingPastBadEvents(t *testing.T) {
	h := newHarness(t)
	poisonConstraint(t, h)
	b := publishSetup(t, h.js, h.pepper)
	h.waitProjected(t, b.victim, 1)
	b.publishMixed(t, h.js, h.pepper)
	h.waitProjected(t, b.good2, 1)
	cons, err := h.js.Consumer(t.Context(), events.StreamChallenges, events.VerifierConsumer.Durable)
	testenv.Must(t, err, "consumer")
	testenv.Eventually(t, 10*time.Second, "every event settled", func() bool {
		info, err := cons.Info(t.Context())
		return err == nil && info.NumAckPending == 0 && info.NumPending == 0 && info.NumRedelivered == 0
	})
	b.check(t, h, func(tenant, requestID, code string) events.VerifyReply {
		if tenant != "acme" {
			t.Fatalf("tenant %s", tenant)
		}
		return h.verify(t, requestID, code, "")
	})
}
