package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestOneErasureReachesEveryStore: a person who asked for codes, verified one and holds a
// live one, with dead letters of theirs in OTP_DLQ (one as older releases wrote them, the
// body in clear, one sealed and named by hash), is erased with one command. Afterwards a
// dump of every table of every schema and of every message of every stream, read back
// through NATS, holds neither their address, nor their IP, nor their session id, while
// another person's data is still there; their live code no longer verifies; each service
// answered; the chain still verifies; and an audit replay does not rebuild what was erased.
func TestOneErasureReachesEveryStore(t *testing.T) {
	w := newWorld(t)
	w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())
	const (
		ana, anaIP, anaSession = "ana@example.com", "203.0.113.9", "sess-ana-4711"
		bo, boIP               = "bo@example.com", "198.51.100.7"
	)
	a.request(t, "acme", fmt.Sprintf(`{"request_id":"er-1","recipient":"Ana@Example.com","purpose":"login","context":{"ip":%q,"session_id":%q}}`, anaIP, anaSession))
	a.request(t, "acme", fmt.Sprintf(`{"request_id":"er-2","recipient":%q,"purpose":"login","context":{"ip":%q}}`, bo, boIP))
	w.smtp.WaitFor(t, 2, 30*time.Second)
	code := codeOf(t, mailsTo(w.smtp.Mails(), "Ana@Example.com")[0])
	reply, err := a.nc.Request("otp.verify.acme", fmt.Appendf(nil, `{"request_id":"er-1","code":%q,"context":{"session_id":%q}}`, code, anaSession), 5*time.Second)
	testenv.Must(t, err, "verify")
	if !strings.Contains(string(reply.Data), `"status":"verified"`) {
		t.Fatalf("verify: %s", reply.Data)
	}
	a.request(t, "acme", fmt.Sprintf(`{"request_id":"er-3","recipient":%q,"purpose":"signup","context":{"ip":%q}}`, ana, anaIP))
	w.smtp.WaitFor(t, 3, 30*time.Second)
	live := codeOf(t, mailsTo(w.smtp.Mails(), ana)[0])

	subjects, err := keys.ParseSubjects(w.env["OTP_SUBJECT_KEY"])
	testenv.Must(t, err, "subject key")
	deadLetter := func(tenant, body, hash string) {
		m := nats.NewMsg(events.TypeDLQ.Subject(tenant))
		m.Data = []byte(body)
		m.Header.Set(events.HeaderDLQReason, "test: dead letter")
		if hash != "" {
			m.Header.Set(events.HeaderRecipientHash, hash)
		}
		_, err := a.js.PublishMsg(context.Background(), m)
		testenv.Must(t, err, "publish dead letter")
	}
	// Dead letters as an earlier release wrote them (in the clear): ana's goes; joana's
	// and another tenant's ana's stay.
	deadLetter("acme", fmt.Sprintf(`{"request_id":"er-9","recipient":%q,"purpose":"login","context":{"ip":%q}}`, ana, anaIP), "")
	deadLetter("acme", `{"request_id":"er-8","recipient":"joana@example.com","purpose":"login"}`, "")
	deadLetter("globex", fmt.Sprintf(`{"request_id":"gx-1","recipient":%q,"purpose":"login"}`, ana), "")
	deadLetter("acme", "sealed: opaque too", subjects.Subject("acme", bo))
	// A dead letter written by the verifier itself: a code of ana's it refuses (an insider
	// published it with a session id that holds a line break), sealed, named by her hash.
	pepper, err := keys.ParsePepper(w.env["OTP_CODE_PEPPER"])
	testenv.Must(t, err, "pepper")
	mac, err := pepper.MAC("p1", "00000000-0000-4000-8000-00000000e001", "123456")
	testenv.Must(t, err, "mac")
	bad, err := events.NewMsg(events.TypeChallenge, "acme", "challenge:bad:1", "", events.Challenge{
		ChallengeID: "00000000-0000-4000-8000-00000000e001", Tenant: "acme", RequestID: "er-bad", CodeSeq: 1, CodeLength: 6,
		CodeHMAC: mac, PepperKeyID: "p1", MaxAttempts: 5, SessionID: "bad\nsession", RecipientHashes: subjects.SubjectHashes("acme", ana),
		IssuedAt: time.Now().UTC(), ExpiresAt: time.Now().Add(time.Minute).UTC()}, events.Envelope{Source: "insider"})
	testenv.Must(t, err, "challenge")
	_, err = a.js.PublishMsg(context.Background(), bad)
	testenv.Must(t, err, "publish challenge")
	testenv.Eventually(t, 30*time.Second, "the verifier's dead letter", func() bool {
		for _, m := range testenv.Messages(t, a.js, events.StreamDLQ, "") {
			if m.Header.Get(events.HeaderDLQStream) == events.StreamChallenges {
				return subjects.MatchesSubject(m.Header.Get(events.HeaderRecipientHash), "acme", ana)
			}
		}
		return false
	})

	db := openDB(t, w.db)
	testenv.Eventually(t, 30*time.Second, "the story audited", func() bool {
		return len(auditTypes(t, db, "acme", "er-1")) == 3 && len(auditTypes(t, db, "acme", "er-3")) == 2 &&
			len(auditTypes(t, db, "acme", "er-2")) == 2
	})

	// Her two requests' rows in the status projection are erased too: wait until it has
	// them. The verifier's erasure or the projection, whichever reads the request first,
	// deletes them, so the verifier counts 4 rows or 6.
	idle(t, a.js, events.StreamEvents, events.VerifierStatusConsumer.Durable)
	c, out := w.cli(t, "erase", "--tenant", "acme", "--recipient", "ANA@example.com")
	if c != 0 {
		t.Fatalf("erase: exit %d\n%s", c, out)
	}
	for _, want := range []string{"deleted 2 requests from OTP_REQUESTS, 3 codes from OTP_CHALLENGES and 2 dead letters from OTP_DLQ",
		"issuer     erased 4 rows", "dispatcher erased 0 rows", "verifier   erased ", "auditor    erased"} {
		if !strings.Contains(out, want) {
			t.Errorf("erase output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "verifier   erased 4 rows") && !strings.Contains(out, "verifier   erased 6 rows") {
		t.Errorf("the verifier erased neither her 4 rows nor them and her 2 status rows:\n%s", out)
	}
	var statusLeft []string
	rows, err := db.Query(context.Background(), `SELECT request_id FROM verifier.request_status ORDER BY 1`)
	testenv.Must(t, err, "status rows")
	for rows.Next() {
		var id string
		testenv.Must(t, rows.Scan(&id), "scan")
		statusLeft = append(statusLeft, id)
	}
	if strings.Join(statusLeft, ",") != "er-2" {
		t.Errorf("status rows left %v, want bo's er-2 alone", statusLeft)
	}
	if r := a.verify(t, "acme", "er-3", live); r.Status != events.StatusNotFound {
		t.Fatalf("the erased person's live code: %+v, want not_found", r)
	}
	// The verify above leaves an event; wait until the auditor has everything.
	idle(t, a.js, events.StreamEvents, events.ConsumerAuditor)

	var dump strings.Builder
	for _, schema := range []string{"issuer", "dispatcher", "verifier", "audit"} {
		d, counts := testenv.DumpSchema(t, db, schema)
		if len(counts) == 0 {
			t.Fatalf("schema %s has no tables", schema)
		}
		dump.WriteString(d)
	}
	tables := dump.String()
	testenv.AssertNoPlaintext(t, tables, ana, "a***@example.com", anaIP, anaSession)

	streams := dumpStreams(t, a)
	// joana@example.com contains her address, and ana of globex is another tenant's
	// person: both stay, and are checked below.
	var hers strings.Builder
	for _, l := range strings.Split(streams, "\n") {
		if !strings.Contains(l, "joana@example.com") && !strings.Contains(l, "otp.dlq.globex") {
			hers.WriteString(l + "\n")
		}
	}
	testenv.AssertNoPlaintext(t, hers.String(), ana, anaIP, anaSession)
	// The dumps are whole: the other person is still there, in clear where clear is allowed.
	if !strings.Contains(streams, bo) || !strings.Contains(streams, boIP) || !strings.Contains(streams, subjects.Subject("acme", bo)) {
		t.Fatalf("the stream dump lacks the other person; it does not read what it should:\n%s", streams)
	}
	// The dead letters of other people, and of ana in another tenant, are still there.
	left := map[string]bool{}
	for _, m := range testenv.Messages(t, a.js, events.StreamDLQ, "") {
		left[m.Subject+" "+string(m.Data)] = true
	}
	for _, want := range []string{`otp.dlq.acme {"request_id":"er-8","recipient":"joana@example.com","purpose":"login"}`,
		fmt.Sprintf(`otp.dlq.globex {"request_id":"gx-1","recipient":%q,"purpose":"login"}`, ana), "otp.dlq.acme sealed: opaque too"} {
		if !left[want] {
			t.Errorf("the erasure deleted another person's dead letter: %s", want)
		}
	}
	// Only the erasure's own record names her, by hash.
	var named int
	testenv.Must(t, db.QueryRow(context.Background(), `SELECT count(*) FROM audit.events WHERE type <> 'otp.erasure_requested'
		AND (payload::text || coalesce(pii::text, '') || coalesce(convert_from(recipient_hash, 'UTF8'), '')) LIKE '%' || $1 || '%'`,
		strings.SplitN(subjects.Subject("acme", ana), ":", 2)[1]).Scan(&named), "named")
	if named != 0 {
		t.Fatalf("%d audit rows still hold her subject hash", named)
	}
	if !strings.Contains(tables, "b***@example.com") {
		t.Fatalf("the table dump lacks the other person's masked address:\n%s", tables)
	}

	if c, out := w.cli(t, "audit", "verify", "--db", w.auditDB); c != 0 || !strings.Contains(out, "erased") {
		t.Fatalf("verify after the erasure: exit %d, %s", c, out)
	}
	// A replay rebuilds the log as it is, erasure included, and never the erased data.
	fresh := testenv.Database(t)
	w.cli(t, "audit", "replay", "--to", fresh)
	if live, rebuilt := dumpAudit(t, w.db), dumpAudit(t, fresh); live != rebuilt {
		t.Fatalf("replayed log differs from the live one:\nlive:\n%s\nreplayed:\n%s", live, rebuilt)
	}
	_, lines := w.cli(t, "audit", "replay", "--type", "verified")
	replayed, _ := testenv.DumpSchema(t, openDB(t, fresh), "audit")
	testenv.AssertNoPlaintext(t, replayed+lines, ana, "a***@example.com", anaIP, anaSession)
	if !strings.Contains(lines, `"erased":true`) {
		t.Fatalf("the verified event of the erased person is not marked erased:\n%s", lines)
	}
}

// TestEraseNamesServicesThatDidNotAnswer: a service that is not running answers when it
// returns; until then the command says which did not answer and exits 1.
func TestEraseNamesServicesThatDidNotAnswer(t *testing.T) {
	w := newWorld(t)
	stop := w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())
	a.request(t, "acme", `{"request_id":"down-1","recipient":"cy@example.com","purpose":"login"}`)
	w.smtp.WaitFor(t, 1, 30*time.Second)
	stop()

	var out bytes.Buffer
	code, err := run(context.Background(), []string{"erase", "--tenant", "acme", "--recipient", "cy@example.com", "--wait", "1s"},
		w.getenv, &out, io.Discard)
	if code != 1 || err == nil || !strings.Contains(err.Error(), "no answer within 1s from issuer, dispatcher, verifier, auditor") {
		t.Fatalf("erase with every service down: exit %d, %v\n%s", code, err, out.String())
	}
	// Back up: every service erases from its durable consumer and answers.
	w.runInProcess(t, &testenv.LogBuffer{})
	testenv.Eventually(t, 60*time.Second, "every service answered", func() bool {
		services := erasedBy(t, a)
		return len(services) == 4
	})
	if got := erasedBy(t, a); strings.Join(got, ",") != "auditor,dispatcher,issuer,verifier" {
		t.Fatalf("answered: %v", got)
	}
}

// TestEraseIgnoresAnswersInAnotherServicesName: any service may publish otp.erased, so
// a compromised one could answer an erasure in the others' names while they have erased
// nothing. The command takes a service's answer only once that service's own durable
// consumer has acknowledged the request: with every service down and an insider
// answering for all four the moment the request appears, it still names all four as
// not having answered.
func TestEraseIgnoresAnswersInAnotherServicesName(t *testing.T) {
	w := newWorld(t)
	stop := w.runInProcess(t, &testenv.LogBuffer{})
	a := newApp(t, w.nats.ClientURL())
	a.request(t, "acme", `{"request_id":"spoof-1","recipient":"di@example.com","purpose":"login"}`)
	w.smtp.WaitFor(t, 1, 30*time.Second)
	stop()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	forged := make(chan error, 1)
	var forgedAt time.Time // when the last forged answer was acknowledged
	go func() {
		// The insider: as soon as the erasure request is on OTP_EVENTS, answer it for all.
		for ctx.Err() == nil {
			for _, m := range testenv.Messages(t, a.js, events.StreamEvents, events.TypeErasureRequested.Subject("acme")) {
				var req events.ErasureRequested
				if err := events.DecodeEvent(m.Data, &req); err != nil {
					forged <- err
					return
				}
				for _, svc := range erasingServices {
					if err := platform.PublishErased(ctx, a.js, svc, req, 0); err != nil {
						forged <- err
						return
					}
				}
				forgedAt = time.Now()
				forged <- nil
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	var out bytes.Buffer
	code, err := run(context.Background(), []string{"erase", "--tenant", "acme", "--recipient", "di@example.com", "--wait", "3s"},
		w.getenv, &out, io.Discard)
	gaveUp := time.Now()
	select {
	case ferr := <-forged:
		testenv.Must(t, ferr, "forge the answers")
	case <-time.After(10 * time.Second):
		t.Fatal("the forged answers were never published")
	}
	if !forgedAt.Before(gaveUp.Add(-time.Second)) {
		t.Fatalf("the forged answers landed at %v, too late before erase gave up at %v to be read", forgedAt, gaveUp)
	}
	if got := erasedBy(t, a); len(got) != 4 {
		t.Fatalf("forged answers on OTP_EVENTS: %v", got)
	}
	if code != 1 || err == nil || !strings.Contains(err.Error(), "no answer within 3s from issuer, dispatcher, verifier, auditor") {
		t.Fatalf("erase with every service down and forged answers: exit %d, %v\n%s", code, err, out.String())
	}
}

// erasedBy lists the services that published otp.erased, sorted.
func erasedBy(t *testing.T, a *app) []string {
	var out []string
	for _, m := range testenv.Messages(t, a.js, events.StreamEvents, events.TypeErased.Wildcard()) {
		var e events.Erased
		testenv.Must(t, json.Unmarshal(m.Data, &e), "erased")
		out = append(out, e.Service)
	}
	sort.Strings(out)
	return out
}

// dumpStreams reads every message of every stream of the contract back through NATS:
// subject, headers and body, one message a line.
func dumpStreams(t *testing.T, a *app) string {
	t.Helper()
	var b strings.Builder
	for _, cfg := range events.StreamConfigs(events.StreamOptions{}) {
		for _, m := range testenv.Messages(t, a.js, cfg.Name, "") {
			h, _ := json.Marshal(m.Header)
			fmt.Fprintf(&b, "%s %d %s %s %s\n", cfg.Name, m.Sequence, m.Subject, h, m.Data)
		}
	}
	return b.String()
}

// TestRequestNames: a body in the clear names a person by its recipient, canonical form,
// or, when it is not JSON, by the whole address; never by an address that contains it.
func TestRequestNames(t *testing.T) {
	for _, tc := range []struct {
		body string
		want bool
	}{
		{`{"recipient":"ANA@example.com"}`, true},
		{`{"recipient":"joana@example.com"}`, false},
		{`{"recipient":"ana@example.com.evil"}`, false},
		{`{"request_id":"ana@example.com"}`, false}, // JSON: only the recipient counts
		{`{"recipient":"ana@example.com",`, true},   // not JSON: the whole address
		{`{"recipient":"joana@example.com",`, false},
		{`<ana@example.com>`, true},
		{``, false},
	} {
		if got := requestNames([]byte(tc.body), "ana@example.com"); got != tc.want {
			t.Errorf("requestNames(%q) = %v, want %v", tc.body, got, tc.want)
		}
	}
}
