package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
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

// deadLetterOf writes the dead letter of orig (stored at stream/seq) to OTP_DLQ as a
// consumer does (sealed whole under OTP_DLQ_KEY, the reason and origin in headers) and
// returns the entry's sequence.
func (w *world) deadLetterOf(t *testing.T, js jetstream.JetStream, consumer, stream string, seq uint64, orig *nats.Msg, rcpt, reason string) uint64 {
	t.Helper()
	return w.deadLetterOfID(t, js, platform.DeadLetterID(stream, seq, consumer), consumer, stream, seq, orig, rcpt, reason)
}

// deadLetterOfID is deadLetterOf under message id id (two entries of one original).
func (w *world) deadLetterOfID(t *testing.T, js jetstream.JetStream, id, consumer, stream string, seq uint64, orig *nats.Msg, rcpt, reason string) uint64 {
	t.Helper()
	sealer, err := platform.LoadDLQKey(w.getenv)
	testenv.Must(t, err, "dlq key")
	_, tenant, err := events.SplitSubject(orig.Subject)
	testenv.Must(t, err, "subject")
	sealed, err := sealer.SealDeadLetter(tenant, stream, seq, rcpt, events.DeadLetter{Subject: orig.Subject, Header: orig.Header, Data: orig.Data})
	testenv.Must(t, err, "seal")
	m := nats.NewMsg(events.TypeDLQ.Subject(tenant))
	m.Data, err = json.Marshal(sealed)
	testenv.Must(t, err, "marshal")
	m.Header.Set(jetstream.MsgIDHeader, id)
	m.Header.Set(events.HeaderDLQReason, reason)
	m.Header.Set(events.HeaderDLQSubject, orig.Subject)
	m.Header.Set(events.HeaderDLQConsumer, consumer)
	m.Header.Set(events.HeaderDLQStream, stream)
	m.Header.Set(events.HeaderDLQSequence, fmt.Sprint(seq))
	m.Header.Set(events.HeaderDLQDelivered, "10")
	if rcpt != "" {
		m.Header.Set(events.HeaderRecipientHash, rcpt)
	}
	ack, err := js.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish dead letter")
	return ack.Sequence
}

// stored is the last message on subject of stream, as a message to dead-letter.
func stored(t *testing.T, js jetstream.JetStream, stream, subject string) (*nats.Msg, uint64) {
	t.Helper()
	st, err := js.Stream(context.Background(), stream)
	testenv.Must(t, err, "stream %s", stream)
	m, err := st.GetLastMsgForSubject(context.Background(), subject)
	testenv.Must(t, err, "last of %s", subject)
	return &nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data}, m.Sequence
}

// TestDLQOperatorWorksDeadLetters: dead letters of every consumer are listed (one line
// each, the recipient only as its hash), filtered, opened (with a warning), redriven and
// dropped through the CLI against a running pipeline. A redrive of what was already
// handled (a request, an event the auditor chained) makes no second issuance, mail or
// audit row; a redrive of what was never handled (a request whose original id the
// duplicate window still holds) reaches its outcome: a mail. What is not redriven — a
// dispatch job, a code, an event of the verifier's projection or of an erasure
// consumer, an entry whose original OTP_EVENTS no longer holds as sealed — is refused,
// names what to do instead, and stays until dropped. Each redrive and drop is an
// otp.operator_action without personal data, and OTP_DLQ ends empty.
// (services/auditor TestARedriveChainsTheEventTheAuditorGaveUp redrives an event that
// had no row.)
func TestDLQOperatorWorksDeadLetters(t *testing.T) {
	w := newWorld(t)
	a := newApp(t, w.nats.ClientURL())
	ctx := context.Background()

	// A request that was dead-lettered before the issuer handled it (its poison rule no
	// longer applies): stored with an app's message id, then gone from the stream. The
	// stream's duplicate window still remembers that id.
	lost := nats.NewMsg("otp.requested.acme")
	lost.Data = []byte(`{"request_id":"dl-2","recipient":"bea@example.com","purpose":"login"}`)
	lost.Header.Set(jetstream.MsgIDHeader, "app:dl-2")
	lostAck, err := a.js.PublishMsg(ctx, lost)
	testenv.Must(t, err, "publish the lost request")
	reqs, err := a.js.Stream(ctx, events.StreamRequests)
	testenv.Must(t, err, "requests")
	testenv.Must(t, reqs.SecureDeleteMsg(ctx, lostAck.Sequence), "delete the lost request")

	w.runInProcess(t, &testenv.LogBuffer{})
	// OTP_DISPATCH is a work queue: the job is gone once sent, so it is caught on the way.
	jobs, err := a.nc.SubscribeSync("otp.dispatch.acme")
	testenv.Must(t, err, "subscribe to jobs")
	a.request(t, "acme", `{"request_id":"dl-1","recipient":"ana@example.com","purpose":"login"}`)
	w.smtp.WaitFor(t, 1, 30*time.Second)
	db := openDB(t, w.db)
	testenv.Eventually(t, 30*time.Second, "dl-1 issued and delivered", func() bool { return len(auditTypes(t, db, "acme", "dl-1")) == 2 })

	subjects, err := keys.ParseSubjects(w.env["OTP_SUBJECT_KEY"])
	testenv.Must(t, err, "subject key")
	ana, bea := subjects.Subject("acme", "ana@example.com"), subjects.Subject("acme", "bea@example.com")

	// Dead letters of what was handled: dl-1's request, its dispatch job and its code.
	req, reqSeq := stored(t, a.js, events.StreamRequests, "otp.requested.acme")
	job, err := jobs.NextMsg(5 * time.Second)
	testenv.Must(t, err, "the dispatch job")
	jobSeq := uint64(1) // the first job of the stream
	code, codeSeq := stored(t, a.js, events.StreamChallenges, "otp.challenge.acme")
	issued, issuedSeq := stored(t, a.js, events.StreamEvents, "otp.issued.acme")
	seqReq := w.deadLetterOf(t, a.js, events.ConsumerIssuer, events.StreamRequests, reqSeq, req, ana, "issuer: database refused it")
	seqJob := w.deadLetterOf(t, a.js, events.ConsumerDispatcher, events.StreamDispatch, jobSeq, job, ana, "dispatcher: deliveries exhausted: timeout")
	seqCode := w.deadLetterOf(t, a.js, events.ConsumerVerifier, events.StreamChallenges, codeSeq, code, ana, "verifier: projection refused it")
	seqEvent := w.deadLetterOf(t, a.js, events.ConsumerAuditor, events.StreamEvents, issuedSeq, issued, ana, "auditor: cannot store")
	// Events no redrive mends: the verifier's projection's and an erasure consumer's; an
	// auditor's entry whose sealed original is not what OTP_EVENTS holds there (its body
	// altered, or another event's sequence), one that OTP_EVENTS no longer holds, and an
	// erasure request (asked again, not done late).
	delivered, deliveredSeq := stored(t, a.js, events.StreamEvents, "otp.delivered.acme")
	seqProjected := w.deadLetterOf(t, a.js, events.ConsumerVerifier, events.StreamEvents, issuedSeq+1<<29, issued, ana, "verifier: refused")
	seqErasure := w.deadLetterOf(t, a.js, events.ErasureConsumer(events.ConsumerDispatcher).Durable, events.StreamEvents, issuedSeq+1<<30, issued, ana, "dispatcher-erasure: refused")
	altered := &nats.Msg{Subject: delivered.Subject, Header: delivered.Header, Data: bytes.Replace(delivered.Data, []byte(`"dl-1"`), []byte(`"dl-X"`), 1)}
	seqAltered := w.deadLetterOf(t, a.js, events.ConsumerAuditor, events.StreamEvents, deliveredSeq, altered, ana, "auditor: cannot store")
	seqMoved := w.deadLetterOfID(t, a.js, "moved", events.ConsumerAuditor, events.StreamEvents, deliveredSeq, issued, ana, "auditor: cannot store")
	seqGone := w.deadLetterOf(t, a.js, events.ConsumerAuditor, events.StreamEvents, issuedSeq+1<<31, issued, ana, "auditor: cannot store")
	erasureReq, err := events.NewMsg(events.TypeErasureRequested, "acme", "erasure:dl", "", events.ErasureRequested{ErasureID: "5f0c8e1a-2b3d-4c5e-8f90-a1b2c3d4e5f6",
		Tenant: "acme", RecipientHashes: []string{ana}, RequestedAt: time.Now().UTC()}, events.Envelope{Source: "otpflow/cli"})
	testenv.Must(t, err, "erasure request")
	seqErasureReq := w.deadLetterOf(t, a.js, events.ConsumerAuditor, events.StreamEvents, issuedSeq+1<<32, erasureReq, ana, "auditor: refused")
	// And two the auditor gave up itself: one it cannot keep, and one the database
	// refused (a constraint, removed once the dead letter is there: the cause fixed).
	_, err = db.Exec(ctx, `ALTER TABLE audit.events ADD CONSTRAINT test_dl9 CHECK (request_id <> 'dl-9')`)
	testenv.Must(t, err, "a constraint the event breaks")
	for _, ev := range []struct{ id, body string }{{"undecodable", `{"challenge_id":`}, {"dl-9", `{"challenge_id":"c-9","tenant":"acme","request_id":"dl-9"}`}} {
		m, err := events.NewMsg(events.TypeVerified, "acme", ev.id, "", json.RawMessage(`{}`), events.Envelope{Source: "test"})
		testenv.Must(t, err, "event %s", ev.id)
		m.Data = []byte(ev.body)
		_, err = a.js.PublishMsg(ctx, m)
		testenv.Must(t, err, "publish %s", ev.id)
	}
	var seqUndecodable, seqMissing uint64
	// The verifier's status projection gives both up too (neither names a challenge it
	// can read), each with a dead letter of its own: on OTP_EVENTS a dead letter's id
	// names its consumer, so the auditor's is not dropped as a repeat of the verifier's.
	statusLetters := 0
	testenv.Eventually(t, 30*time.Second, "the auditor's two dead letters and the status projection's", func() bool {
		seqUndecodable, seqMissing, statusLetters = 0, 0, 0
		for _, m := range testenv.Messages(t, a.js, events.StreamDLQ, "") {
			switch r := m.Header.Get(events.HeaderDLQReason); {
			case strings.HasPrefix(r, "auditor: ") && strings.Contains(r, "test_dl9"):
				seqMissing = m.Sequence
			case m.Header.Get(events.HeaderDLQConsumer) == events.ConsumerAuditor && m.Header.Get(events.HeaderDLQDelivered) != "10":
				seqUndecodable = m.Sequence
			case m.Header.Get(events.HeaderDLQConsumer) == events.VerifierStatusConsumer.Durable:
				statusLetters++
			}
		}
		return seqUndecodable != 0 && seqMissing != 0 && statusLetters == 2
	})
	_, err = db.Exec(ctx, `ALTER TABLE audit.events DROP CONSTRAINT test_dl9`)
	testenv.Must(t, err, "fix the cause")
	// And of what never was: the lost request, and a code the verifier never saw.
	seqLost := w.deadLetterOf(t, a.js, events.ConsumerIssuer, events.StreamRequests, lostAck.Sequence, lost, bea, "issuer: poison rule")
	pepper, err := keys.ParsePepper(w.env["OTP_CODE_PEPPER"])
	testenv.Must(t, err, "pepper")
	const challengeID = "00000000-0000-4000-8000-00000000d103"
	mac, err := pepper.MAC("p1", challengeID, "424242")
	testenv.Must(t, err, "mac")
	fresh, err := events.NewMsg(events.TypeChallenge, "acme", "challenge:"+challengeID+":1", "", events.Challenge{
		ChallengeID: challengeID, Tenant: "acme", RequestID: "dl-3", CodeSeq: 1, CodeLength: 6, CodeHMAC: mac, PepperKeyID: "p1",
		MaxAttempts: 5, RecipientHashes: subjects.SubjectHashes("acme", "cy@example.com"),
		IssuedAt: time.Now().UTC(), ExpiresAt: time.Now().Add(10 * time.Minute).UTC()}, events.Envelope{Source: "issuer"})
	testenv.Must(t, err, "challenge")
	seqFresh := w.deadLetterOf(t, a.js, events.ConsumerVerifier, events.StreamChallenges, 1<<40, fresh, "", "verifier: database refused it")

	// list: one line per entry, no address; the filters.
	_, out := w.cli(t, "dlq", "list")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 16 {
		t.Fatalf("list: %d lines:\n%s", len(lines), out)
	}
	for _, want := range []string{fmt.Sprintf("%d\t", seqReq), "\tissuer\totp.requested.acme\t" + ana + "\tissuer: database refused it",
		"\tdispatcher\totp.dispatch.acme\t", "\tverifier\totp.challenge.acme\t-\tverifier: database refused it"} {
		if !strings.Contains(out, want) {
			t.Errorf("list lacks %q:\n%s", want, out)
		}
	}
	for _, pii := range []string{"ana@", "bea@", "cy@", "example.com"} {
		if strings.Contains(out, pii) {
			t.Errorf("list shows %q:\n%s", pii, out)
		}
	}
	if _, out := w.cli(t, "dlq", "list", "--consumer", "issuer"); strings.Count(out, "\n") != 2 {
		t.Errorf("list --consumer issuer:\n%s", out)
	}
	if _, out := w.cli(t, "dlq", "list", "--reason", "POISON"); strings.Count(out, "\n") != 1 || !strings.HasPrefix(out, fmt.Sprint(seqLost)+"\t") {
		t.Errorf("list --reason POISON:\n%s", out)
	}
	if _, out := w.cli(t, "dlq", "list", "--since", "1h"); strings.Count(out, "\n") != 16 {
		t.Errorf("list --since 1h:\n%s", out)
	}
	if _, out := w.cli(t, "dlq", "list", "--since", time.Now().Add(time.Hour).Format(time.RFC3339)); out != "" {
		t.Errorf("list --since in an hour:\n%s", out)
	}

	// show: the original opened, after a warning.
	_, out = w.cli(t, "dlq", "show", fmt.Sprint(seqLost))
	if !strings.HasPrefix(out, "WARNING:") || !strings.Contains(out, "personal data") || !strings.Contains(out, "subject: otp.requested.acme\n") ||
		!strings.Contains(out, "header Nats-Msg-Id: app:dl-2\n") || !strings.Contains(out, `body: {"request_id":"dl-2","recipient":"bea@example.com"`) {
		t.Errorf("show:\n%s", out)
	}

	// The auditor's event, which it has chained: the redrive is the operator's row, and
	// no second row of the event.
	if c, out := w.cli(t, "dlq", "redrive", fmt.Sprint(seqEvent)); c != 0 ||
		!strings.Contains(out, fmt.Sprintf("otp.issued.acme, consumer auditor) redriven: OTP_EVENTS %d, by OTP_EVENTS ", issuedSeq)) {
		t.Fatalf("redrive of the auditor's event: exit %d, %s", c, out)
	}
	// The event the database refused, now that it takes it: its row, under its own
	// sequence, once.
	if c, out := w.cli(t, "dlq", "redrive", fmt.Sprint(seqMissing)); c != 0 || !strings.Contains(out, "otp.verified.acme, consumer auditor) redriven") {
		t.Fatalf("redrive of the event the auditor gave up: exit %d, %s", c, out)
	}
	testenv.Eventually(t, 30*time.Second, "the redriven event chained", func() bool { return len(auditTypes(t, db, "acme", "dl-9")) == 1 })
	// The events no redrive mends are refused, naming what to do, and stay.
	for _, tc := range []struct {
		seq  uint64
		want string
	}{
		{seqProjected, "an original of OTP_EVENTS read by verifier is not redriven"},
		{seqErasure, "run otpflow erase for the person again"},
		{seqAltered, "is not the entry's original"},
		{seqMoved, "is not the entry's original"},
		{seqGone, "no longer holds sequence"},
		{seqErasureReq, "an erasure request is not chained late"},
		{seqUndecodable, "the auditor still cannot keep"},
	} {
		if c, err := run(ctx, []string{"dlq", "redrive", fmt.Sprint(tc.seq)}, w.getenv, &strings.Builder{}, &strings.Builder{}); c != 1 ||
			err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("redrive of entry %d: exit %d, %v; want %q", tc.seq, c, err, tc.want)
		}
	}

	// Redrive the issuer's two at once.
	if c, out := w.cli(t, "dlq", "redrive", "--all", "--consumer", "issuer"); c != 0 || strings.Count(out, "redriven to OTP_REQUESTS") != 2 {
		t.Fatalf("redrive --all --consumer issuer: exit %d, %s", c, out)
	}
	// A dispatch job and a code are the issuer's to publish: refused, they stay.
	for _, tc := range []struct {
		seq    uint64
		stream string
	}{{seqJob, events.StreamDispatch}, {seqCode, events.StreamChallenges}, {seqFresh, events.StreamChallenges}} {
		if c, err := run(ctx, []string{"dlq", "redrive", fmt.Sprint(tc.seq)}, w.getenv, &strings.Builder{}, &strings.Builder{}); c != 1 ||
			err == nil || !strings.Contains(err.Error(), "an original of "+tc.stream+" is not redriven") {
			t.Fatalf("redrive of a %s original: exit %d, %v", tc.stream, c, err)
		}
	}
	// An entry that says it holds a request of the issuer's but holds a supersession (a
	// service with the DLQ key planted it) is refused before anything is published.
	supersede, err := events.NewMsg(events.TypeChallengeSuperseded, "acme", "planted:1", "", events.Superseded{
		ChallengeID: "00000000-0000-4000-8000-00000000d104", Tenant: "acme"}, events.Envelope{Source: "issuer"})
	testenv.Must(t, err, "supersession")
	seqPlanted := w.deadLetterOf(t, a.js, events.ConsumerIssuer, events.StreamRequests, 1<<41, supersede, "", "issuer: planted")
	if c, err := run(ctx, []string{"dlq", "redrive", fmt.Sprint(seqPlanted)}, w.getenv, &strings.Builder{}, &strings.Builder{}); c != 1 ||
		err == nil || !strings.Contains(err.Error(), "is not one of OTP_REQUESTS") {
		t.Fatalf("redrive of a planted entry: exit %d, %v", c, err)
	}
	if n := len(testenv.Messages(t, a.js, events.StreamChallenges, events.TypeChallengeSuperseded.Subject("acme"))); n != 0 {
		t.Fatalf("the planted entry put %d supersessions on OTP_CHALLENGES", n)
	}
	// Left: what no redrive mends, the status projection's two among them.
	if _, out := w.cli(t, "dlq", "list"); strings.Count(out, "\n") != 13 {
		t.Fatalf("after the redrives, list:\n%s", out)
	}
	if c, out := w.cli(t, "dlq", "drop", "--all"); c != 0 || strings.Count(out, "dropped") != 13 {
		t.Fatalf("drop --all: exit %d, %s", c, out)
	}
	if _, out := w.cli(t, "dlq", "list"); out != "" {
		t.Fatalf("after the drop, list:\n%s", out)
	}

	// The redriven request that was never handled ends in a mail.
	w.smtp.WaitFor(t, 2, 30*time.Second)
	if got := mailsTo(w.smtp.Mails(), "bea@example.com"); len(got) != 1 {
		t.Fatalf("mails to bea: %d", len(got))
	}
	testenv.Eventually(t, 30*time.Second, "dl-2 issued and delivered", func() bool { return len(auditTypes(t, db, "acme", "dl-2")) == 2 })

	// What was handled was not handled again: every consumer idle, then one issuance, one
	// mail and one audit row each for dl-1, and no new dead letter.
	idle(t, a.js, events.StreamRequests, events.ConsumerIssuer)
	idle(t, a.js, events.StreamDispatch, events.ConsumerDispatcher)
	idle(t, a.js, events.StreamChallenges, events.ConsumerVerifier)
	idle(t, a.js, events.StreamEvents, events.ConsumerAuditor)
	if got := mailsTo(w.smtp.Mails(), "ana@example.com"); len(got) != 1 {
		t.Errorf("mails to ana: %d", len(got))
	}
	if got := auditTypes(t, db, "acme", "dl-1"); len(got) != 2 {
		t.Errorf("dl-1 audited as %v", got)
	}
	var codes int
	testenv.Must(t, db.QueryRow(ctx, `SELECT count(*) FROM issuer.codes c JOIN issuer.challenges h USING (challenge_id) WHERE h.request_id = 'dl-1'`).Scan(&codes), "codes")
	if codes != 1 {
		t.Errorf("dl-1 has %d codes", codes)
	}
	if _, out := w.cli(t, "dlq", "list"); out != "" {
		t.Errorf("new dead letters:\n%s", out)
	}

	// Each redrive and drop is audited, without personal data.
	var rows []operatorRow
	testenv.Eventually(t, 30*time.Second, "the redrives audited", func() bool {
		rows = operatorRows(t, w.db, "dlq.redrive")
		return len(rows) == 4
	})
	testenv.Eventually(t, 30*time.Second, "the drops audited", func() bool { return len(operatorRows(t, w.db, "dlq.drop")) == 13 })
	rows = append(rows, operatorRows(t, w.db, "dlq.drop")...)
	for _, r := range rows {
		if r.Tenant != "acme" || !strings.HasPrefix(r.Event.Detail, "OTP_DLQ ") || r.HasRecipientHash || r.Masked != "" {
			t.Errorf("operator row %+v", r)
		}
		for _, pii := range []string{"ana@", "bea@", "cy@", "example.com", ana, bea} {
			if strings.Contains(r.Payload, pii) {
				t.Errorf("operator row holds %q: %s", pii, r.Payload)
			}
		}
	}
	if c, out := w.cli(t, "audit", "verify", "--db", w.auditDB); c != 0 {
		t.Fatalf("audit verify: exit %d, %s", c, out)
	}
}

// TestDLQCommandErrors: what the commands refuse before they connect.
func TestDLQCommandErrors(t *testing.T) {
	getenv := func(string) string { return "" }
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown", []string{"dlq", "purge"}, `unknown dlq command "purge"`},
		{"show without sequence", []string{"dlq", "show"}, "which sequence"},
		{"redrive without target", []string{"dlq", "redrive"}, "one sequence or --all"},
		{"drop both", []string{"dlq", "drop", "3", "--all"}, "one sequence or --all"},
		{"consumer without all", []string{"dlq", "redrive", "3", "--consumer", "issuer"}, "--consumer goes with --all"},
		{"bad sequence", []string{"dlq", "drop", "x"}, "not a sequence"},
		{"bad since", []string{"dlq", "list", "--since", "yesterday"}, "neither an RFC 3339 time nor a duration"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, err := run(context.Background(), tc.args, getenv, &strings.Builder{}, &strings.Builder{})
			if code != 2 || err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("exit %d, %v; want 2 and %q", code, err, tc.want)
			}
		})
	}
}

// TestDLQRedriveRefusesAStreamNobodyReads: with tenant request streams, a redrive lands on
// the tenant's stream; one that OTP_REQUESTS does not source (left by hand, which
// provisioning refuses to do) would take the request and acknowledge it to nobody. The
// redrive is refused before anything is published, and the entry stays.
func TestDLQRedriveRefusesAStreamNobodyReads(t *testing.T) {
	w := newWorld(t)
	a := newApp(t, w.nats.ClientURL())
	ctx := context.Background()
	_, err := platform.Provision(ctx, a.js, events.StreamOptions{Tenants: []string{"acme"}, TenantRequestsMaxBytes: 1 << 20})
	testenv.Must(t, err, "tenant streams for acme")
	_, err = a.js.CreateStream(ctx, jetstream.StreamConfig{Name: events.TenantRequestsStream("globex"), Subjects: []string{"otp.requested.globex"}})
	testenv.Must(t, err, "a stream of globex that OTP_REQUESTS does not source")
	lost := nats.NewMsg("otp.requested.globex")
	lost.Data = []byte(`{"request_id":"dl-g","recipient":"gil@example.com","purpose":"login"}`)
	seq := w.deadLetterOf(t, a.js, events.ConsumerIssuer, events.StreamRequests, 7, lost, "", "issuer: database refused it")

	var out, errOut bytes.Buffer
	code, err := run(ctx, []string{"dlq", "redrive", fmt.Sprint(seq)}, w.getenv, &out, &errOut)
	if code == 0 || !strings.Contains(fmt.Sprint(err, out.String(), errOut.String()), "nor sources a request stream of tenant globex") {
		t.Fatalf("redrive into a stream nobody reads: exit %d, %v\n%s\n%s", code, err, out.String(), errOut.String())
	}
	if msgs := testenv.Messages(t, a.js, events.TenantRequestsStream("globex"), ""); len(msgs) != 0 {
		t.Fatalf("the redrive published %d messages onto a stream nobody reads", len(msgs))
	}
	if dl := testenv.Messages(t, a.js, events.StreamDLQ, "otp.dlq.globex"); len(dl) != 1 {
		t.Fatalf("the entry is gone: %d left", len(dl))
	}
}

// TestDLQConsumerFilter: --consumer issuer takes the issuer's dead letters whichever of
// its durables gave them up (one per tenant with tenant request streams), and nothing
// else; any other name takes that durable alone.
func TestDLQConsumerFilter(t *testing.T) {
	for _, c := range []struct {
		want, had string
		ok        bool
	}{
		{"", "dispatcher", true},
		{"issuer", "issuer", true},
		{"issuer", "issuer_acme", true},
		{"issuer", "issuer-erasure", false},
		{"issuer", "issuer_", false},
		{"issuer", "dispatcher", false},
		{"issuer_acme", "issuer_acme", true},
		{"issuer_acme", "issuer_globex", false},
		{"issuer_acme", "issuer", false},
		{"dispatcher", "dispatcher", true},
	} {
		if got := ofConsumer(c.want, c.had); got != c.ok {
			t.Errorf("--consumer %q on a dead letter of %q: %v, want %v", c.want, c.had, got, c.ok)
		}
	}
}
