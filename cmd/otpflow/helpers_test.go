package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/quotedprintable"
	"net/mail"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// world is the outside of the pipeline: a NATS server, a database, an SMTP server, and
// the environment the services are configured from.
type world struct {
	nats    *server.Server
	db      string // the database as an administrator (the tests' own reads and tampering)
	auditDB string // the database as the auditor's role (the audit commands)
	smtp    *testenv.SMTPServer
	env     map[string]string
}

// newWorld migrates a fresh database as otpflow migrate does; each service connects as its
// own role (OTP_<SERVICE>_DATABASE_URL).
func newWorld(t testing.TB) *world {
	t.Helper()
	ns := testenv.NATS(t)
	testenv.JetStream(t, ns) // provisioned, as otpflow provision does before the services start
	return newWorldOn(t, ns)
}

// newWorldOn is newWorld on the NATS server ns.
func newWorldOn(t testing.TB, ns *server.Server) *world {
	t.Helper()
	d := testenv.NewDB(t)
	d.Migrate(t, specs()...)
	w := &world{nats: ns, db: d.URL, auditDB: d.RoleURL("auditor"), smtp: testenv.StartSMTP(t)}
	w.env = map[string]string{
		"OTP_NATS_URL":             w.nats.ClientURL(),
		"OTP_MIGRATE_DATABASE_URL": d.URL,
		"OTP_DB_ROLE_PREFIX":       d.Prefix,
		"OTP_CODE_PEPPER":          keys.Generate("p1", 32),
		"OTP_SEAL_KEY":             keys.Generate("s1", 32),
		"OTP_AUDIT_KEY":            keys.Generate("a1", 32),
		"OTP_AUDIT_CHAIN_KEY":      keys.Generate("c1", 32),
		"OTP_AUDIT_SIGNING_KEY":    keys.Generate("sig1", 32),
		"OTP_SUBJECT_KEY":          keys.Generate("k1", 32),
		"OTP_DLQ_KEY":              keys.Generate("d1", 32),
		"OTP_PROVIDERS":            "smtp",
		"OTP_SMTP_URL":             w.smtp.URL(),
		"OTP_MAIL_FROM":            "Acme <no-reply@acme.example>",
		"OTP_LOG_LEVEL":            "debug",
		"OTP_SHUTDOWN_TIMEOUT":     "20s",
	}
	for _, s := range specs() {
		w.env[platform.DatabaseURLVar(s.Name)] = d.RoleURL(s.Name)
	}
	return w
}

func (w *world) getenv(k string) string { return w.env[k] }

// runInProcess runs the four services in this process until the returned stop is called.
func (w *world) runInProcess(t *testing.T, logs *testenv.LogBuffer) (stop func()) {
	t.Helper()
	return testenv.Start(t, func(ctx context.Context) error { return runPipeline(ctx, w.getenv, logs) })
}

// app is an upstream application: it speaks raw JSON over NATS, as a non-Go app would.
type app struct {
	nc *nats.Conn
	js jetstream.JetStream
}

func newApp(t *testing.T, url string) *app {
	t.Helper()
	nc, err := nats.Connect(url)
	testenv.Must(t, err, "connect app")
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	return &app{nc: nc, js: js}
}

// request publishes a raw otp.requested body, retrying until the stream exists.
func (a *app) request(t *testing.T, tenant, body string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := a.js.Publish(ctx, "otp.requested."+tenant, []byte(body))
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("publish request: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// burst publishes n requests at once (request ids <idPrefix>-<i>, recipients
// <rcptPrefix><i>@example.com) and waits for the stream's acks.
func (a *app) burst(t *testing.T, tenant, idPrefix, rcptPrefix string, n int) {
	t.Helper()
	for i := range n {
		body := fmt.Sprintf(`{"request_id":"%s-%d","recipient":"%s%d@example.com","purpose":"login"}`, idPrefix, i, rcptPrefix, i)
		_, err := a.js.PublishAsync("otp.requested."+tenant, []byte(body))
		testenv.Must(t, err, "publish")
	}
	select {
	case <-a.js.PublishAsyncComplete():
	case <-time.After(20 * time.Second):
		t.Fatal("burst not acknowledged")
	}
}

func (a *app) verify(t *testing.T, tenant, requestID, code string) events.VerifyReply {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"request_id": requestID, "code": code})
	var msg *nats.Msg
	var err error
	for range 50 {
		msg, err = a.nc.Request("otp.verify."+tenant, body, 5*time.Second)
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond) // the verifier may still be starting
	}
	testenv.Must(t, err, "verify request")
	var r events.VerifyReply
	testenv.Must(t, json.Unmarshal(msg.Data, &r), "decode reply %q", msg.Data)
	return r
}

// codeOf returns the code of a mail, read from its body (text and HTML part), and checks
// that the subject does not carry it: subjects show on lock screens and in provider logs.
func codeOf(t *testing.T, m testenv.Mail) string {
	t.Helper()
	msg, err := mail.ReadMessage(strings.NewReader(string(m.Data)))
	testenv.Must(t, err, "parse mail")
	body := decodedBody(t, m)
	sub := sixDigits.FindStringSubmatch(body)
	if sub == nil {
		t.Fatalf("no code in the mail:\n%s", body)
	}
	if strings.Count(body, sub[1]) < 2 {
		t.Fatalf("code should appear in the text and the HTML part:\n%s", m.Data)
	}
	if containsCode(msg.Header.Get("Subject"), sub[1]) {
		t.Fatalf("the subject %q carries the code", msg.Header.Get("Subject"))
	}
	return sub[1]
}

// decodedBody is the mail's body with quoted-printable undone (both parts are QP).
func decodedBody(t *testing.T, m testenv.Mail) string {
	t.Helper()
	msg, err := mail.ReadMessage(strings.NewReader(string(m.Data)))
	testenv.Must(t, err, "parse mail")
	b, err := io.ReadAll(quotedprintable.NewReader(msg.Body))
	testenv.Must(t, err, "decode body")
	return string(b)
}

// mailsTo returns the mails addressed to rcpt.
func mailsTo(mails []testenv.Mail, rcpt string) []testenv.Mail {
	var out []testenv.Mail
	for _, m := range mails {
		for _, to := range m.To {
			if to == rcpt {
				out = append(out, m)
			}
		}
	}
	return out
}

// containsCode reports whether code appears in s as a number of its own (not inside a
// longer run of digits, such as a timestamp).
func containsCode(s, code string) bool {
	return regexp.MustCompile(`(^|\D)` + code + `(\D|$)`).MatchString(s)
}

func openDB(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	testenv.Must(t, err, "open db")
	t.Cleanup(pool.Close)
	return pool
}

// auditTypes lists the audit log's event types for one request, in stream order.
func auditTypes(t *testing.T, db *pgxpool.Pool, tenant, requestID string) []string {
	t.Helper()
	rows, err := db.Query(context.Background(),
		`SELECT type FROM audit.events WHERE tenant = $1 AND request_id = $2 ORDER BY stream_seq`, tenant, requestID)
	if err != nil {
		return nil // the schema may not exist yet
	}
	var out []string
	for rows.Next() {
		var s string
		_ = rows.Scan(&s)
		out = append(out, s)
	}
	return out
}

// idle waits until the consumer has handed out and settled everything its stream held for
// it when idle was called. Nothing pending alone is not enough: the server counts a stored
// message into a consumer's pending asynchronously, so right after a publish a consumer
// can show nothing pending for a message it has not yet seen; the last message of its
// filter must also be behind its ack floor.
func idle(t *testing.T, js jetstream.JetStream, stream, consumer string) {
	t.Helper()
	ctx := context.Background()
	c, err := js.Consumer(ctx, stream, consumer)
	testenv.Must(t, err, "consumer %s on %s", consumer, stream)
	st, err := js.Stream(ctx, stream)
	testenv.Must(t, err, "stream %s", stream)
	cfg := c.CachedInfo().Config
	filters := cfg.FilterSubjects
	if cfg.FilterSubject != "" {
		filters = append(slices.Clone(filters), cfg.FilterSubject)
	}
	if len(filters) == 0 {
		filters = st.CachedInfo().Config.Subjects
	}
	var last uint64
	for _, f := range filters {
		if m, err := st.GetLastMsgForSubject(ctx, f); err == nil {
			last = max(last, m.Sequence)
		} else if !errors.Is(err, jetstream.ErrMsgNotFound) {
			t.Fatalf("the last message of %s on %s: %v", f, stream, err)
		}
	}
	testenv.Eventually(t, 30*time.Second, consumer+" to be idle", func() bool {
		info, err := c.Info(ctx)
		return err == nil && info.NumPending == 0 && info.NumAckPending == 0 && info.AckFloor.Stream >= last
	})
}
