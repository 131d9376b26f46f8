package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	gosmtp "github.com/emersion/go-smtp"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/testenv"
	"github.com/otpflow/otpflow/services/dispatcher/maildir"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/smtp"
	"github.com/prometheus/client_golang/prometheus"
)

type harness struct {
	js     jetstream.JetStream
	sealer *keys.Sealer
	smtp   *testenv.SMTPServer
	svc    *Service
	pool   *pgxpool.Pool
	log    *testenv.LogBuffer   // what the dispatcher logged
	reg    *prometheus.Registry // its metrics
	// subjects and dlq are its OTP_SUBJECT_KEY and OTP_DLQ_KEY.
	subjects *keys.Subjects
	dlq      *keys.Sealer
}

// newHarness runs a dispatcher against a real NATS, PostgreSQL and SMTP server. providers
// replaces the default chain (the SMTP server) when given.
func newHarness(t *testing.T, providers ...mailer.Provider) *harness {
	t.Helper()
	return newHarnessWith(t, nil, func(smtpProvider mailer.Provider) []mailer.Provider {
		if len(providers) == 0 {
			return []mailer.Provider{smtpProvider}
		}
		return providers
	})
}

// newHarnessWith builds the chain with chain, which gets the SMTP server's provider.
func newHarnessWith(t *testing.T, guards map[string]mailer.GuardConfig, chain func(smtp mailer.Provider) []mailer.Provider) *harness {
	t.Helper()
	return newHarnessConfig(t, Config{Guards: guards}, chain)
}

// newHarnessConfig fills cfg's sealer, sender and providers and runs the dispatcher.
func newHarnessConfig(t *testing.T, cfg Config, chain func(smtp mailer.Provider) []mailer.Provider) *harness {
	t.Helper()
	return newHarnessRoute(t, cfg, chain, nil)
}

// newHarnessRoute is newHarnessConfig with the dispatcher reaching its database at the
// URL route makes of the real one (a proxy's); nil connects directly.
func newHarnessRoute(t *testing.T, cfg Config, chain func(smtp mailer.Provider) []mailer.Provider, route func(url string) string) *harness {
	t.Helper()
	h := buildHarness(t, cfg, chain, route, 0)
	testenv.Start(t, h.svc.Run)
	return h
}

// buildHarness is newHarnessRoute without starting the dispatcher; ackWait, when set,
// replaces the consumer's AckWait.
func buildHarness(t *testing.T, cfg Config, chain func(smtp mailer.Provider) []mailer.Provider, route func(url string) string, ackWait time.Duration) *harness {
	t.Helper()
	_, js := testenv.JetStream(t, testenv.NATS(t))
	if cfg.MaxDeliver > 0 || ackWait > 0 { // provisioned so, as OTP_DISPATCH_MAX_DELIVER does
		cc := events.DispatcherConsumer
		if cfg.MaxDeliver > 0 {
			cc.MaxDeliver = cfg.MaxDeliver
		}
		if ackWait > 0 {
			cc.AckWait = ackWait
		}
		_, err := platform.EnsureConsumer(context.Background(), js, events.StreamDispatch, cc)
		testenv.Must(t, err, "dispatcher consumer")
	}
	db := testenv.NewDB(t)
	db.Migrate(t, Spec())
	dbURL := db.RoleURL(Spec().Name)
	if route != nil {
		dbURL = route(dbURL)
	}
	pool := testenv.Pool(t, dbURL)
	sealer, err := keys.ParseSealer(keys.Generate("s1", 32))
	testenv.Must(t, err, "sealer")
	srv := testenv.StartSMTP(t)
	smtpCfg, err := smtp.ParseURL(srv.URL())
	testenv.Must(t, err, "smtp url")
	providers := chain(smtp.New(smtpCfg))
	cfg.Sealer, cfg.Providers, cfg.From, cfg.Concurrency = sealer, providers, "Acme <no-reply@acme.example>", 4
	subjects, err := keys.ParseSubjects(keys.Generate("k1", 32))
	testenv.Must(t, err, "subject key")
	cfg.Subjects, cfg.DLQKey = subjects, testenv.DLQKey(t)
	log, reg := &testenv.LogBuffer{}, prometheus.NewRegistry()
	svc, err := New(cfg, pool, js, testenv.Logger(log), reg)
	testenv.Must(t, err, "new dispatcher")
	return &harness{js: js, sealer: sealer, smtp: srv, svc: svc, pool: pool, log: log, reg: reg, subjects: subjects, dlq: cfg.DLQKey}
}

// publish seals code into a job for rcpt and publishes it with Nats-Msg-Id msgID.
func (h *harness) publish(t *testing.T, challenge, rcpt, code string, expires time.Time, msgID string) {
	t.Helper()
	h.publishJob(t, events.DispatchJob{ChallengeID: challenge, Tenant: "acme", RequestID: "r-" + challenge, CodeSeq: 1,
		Recipient: rcpt, Purpose: "login", Locale: "en", IssuedAt: expires.Add(-5 * time.Minute).UTC(), ExpiresAt: expires, Code: code}, msgID)
}

// publishJob seals job as the issuer does and publishes it with Nats-Msg-Id msgID.
func (h *harness) publishJob(t *testing.T, job events.DispatchJob, msgID string) {
	t.Helper()
	sealed, err := h.sealer.SealJob(job)
	testenv.Must(t, err, "seal")
	m, err := events.NewMsg(events.TypeDispatch, job.Tenant, msgID, job.ChallengeID, sealed, events.Envelope{Source: "test"})
	testenv.Must(t, err, "msg")
	_, err = h.js.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish job")
}

func decode[T any](t *testing.T, m *jetstream.RawStreamMsg) T {
	t.Helper()
	var v T
	testenv.Must(t, json.Unmarshal(m.Data, &v), "decode %s", m.Subject)
	return v
}

func TestJobIsMailedOnceEvenWhenRedelivered(t *testing.T) {
	h := newHarness(t)
	const challenge = "11111111-1111-4111-8111-111111111111"
	h.publish(t, challenge, "ana@example.com", "493027", time.Now().Add(5*time.Minute), "dispatch:a:1")
	mails := h.smtp.WaitFor(t, 1, 20*time.Second)
	if !strings.Contains(string(mails[0].Data), "493027") {
		t.Fatalf("mail lacks the code:\n%s", mails[0].Data)
	}
	delivered := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", 1, 10*time.Second)
	d := decode[events.Delivered](t, delivered[0])
	if d.ChallengeID != challenge || d.Provider != "smtp" || d.Attempts != 1 || d.ProviderMessageID == "" {
		t.Fatalf("delivered = %+v", d)
	}

	// The same job again, as after an acknowledgement that never reached the server.
	h.publish(t, challenge, "ana@example.com", "493027", time.Now().Add(5*time.Minute), "dispatch:a:1-again")
	testenv.Eventually(t, 10*time.Second, "the second job to be settled", func() bool {
		return len(testenv.Messages(t, h.js, events.StreamDispatch, "")) == 0
	})
	time.Sleep(200 * time.Millisecond)
	if n := len(h.smtp.Mails()); n != 1 {
		t.Fatalf("%d mails for one code", n)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamEvents, "otp.delivered.acme")); n != 1 {
		t.Fatalf("%d delivered events; the re-report must carry the same id", n)
	}
}

func TestExpiredJobIsDroppedUnsent(t *testing.T) {
	h := newHarness(t)
	h.publish(t, "22222222-2222-4222-8222-222222222222", "bo@example.com", "111111", time.Now().Add(-time.Second), "dispatch:b:1")
	expired := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.dispatch_expired.acme", 1, 10*time.Second)
	if e := decode[events.DispatchExpired](t, expired[0]); e.ChallengeID != "22222222-2222-4222-8222-222222222222" {
		t.Fatalf("expired = %+v", e)
	}
	if n := len(h.smtp.Mails()); n != 0 {
		t.Fatalf("an expired code was mailed (%d)", n)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDispatch, "")); n != 0 {
		t.Fatalf("expired job left on the work queue (%d)", n)
	}
}

func TestPermanentFailureIsReportedOnceWithoutRetry(t *testing.T) {
	h := newHarness(t)
	var rcpts atomic.Int32
	h.smtp.SetReject(func(string) error {
		rcpts.Add(1)
		return &gosmtp.SMTPError{Code: 550, EnhancedCode: gosmtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	})
	h.publish(t, "33333333-3333-4333-8333-333333333333", "gone@example.com", "222222", time.Now().Add(5*time.Minute), "dispatch:c:1")
	failed := testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivery_failed.acme", 1, 10*time.Second)
	f := decode[events.DeliveryFailed](t, failed[0])
	if !f.Permanent || f.Provider != "smtp" || f.Attempts != 1 || !strings.Contains(f.Reason, "550") {
		t.Fatalf("delivery_failed = %+v", f)
	}
	time.Sleep(1500 * time.Millisecond) // a retry, if any, would come after 1 s
	if n := rcpts.Load(); n != 1 {
		t.Fatalf("%d RCPT attempts, want 1 (no retry on a permanent failure)", n)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDispatch, "")); n != 0 {
		t.Fatalf("failed job left on the work queue (%d)", n)
	}
}

func TestTransientFailureIsRetriedInProcessThenLater(t *testing.T) {
	h := newHarness(t)
	var tries atomic.Int32
	failFirst := atomic.Int32{}
	failFirst.Store(1)
	h.smtp.SetReject(func(string) error {
		if tries.Add(1) <= failFirst.Load() {
			return &gosmtp.SMTPError{Code: 451, EnhancedCode: gosmtp.EnhancedCode{4, 3, 0}, Message: "try later"}
		}
		return nil
	})
	// One 451: the guard retries at once, inside the same delivery of the job.
	h.publish(t, "44444444-4444-4444-8444-444444444444", "cy@example.com", "333333", time.Now().Add(5*time.Minute), "dispatch:d:1")
	h.smtp.WaitFor(t, 1, 20*time.Second)
	d := decode[events.Delivered](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", 1, 10*time.Second)[0])
	if d.Attempts != 1 || tries.Load() != 2 {
		t.Fatalf("delivered on delivery %d after %d SMTP tries, want 1 and 2", d.Attempts, tries.Load())
	}

	// Three 451s use up the in-process retries: the job goes back to the broker and
	// the next delivery sends it.
	tries.Store(0)
	failFirst.Store(3)
	start := time.Now()
	h.publish(t, "44444444-4444-4444-8444-444444444445", "cy2@example.com", "333334", time.Now().Add(5*time.Minute), "dispatch:d:2")
	h.smtp.WaitFor(t, 2, 20*time.Second)
	d = decode[events.Delivered](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", 2, 10*time.Second)[1])
	if d.Attempts != 2 || tries.Load() != 4 {
		t.Fatalf("delivered on delivery %d after %d SMTP tries, want 2 and 4", d.Attempts, tries.Load())
	}
	if took := time.Since(start); took < 800*time.Millisecond {
		t.Fatalf("redelivered after %v: the broker delay (about 1s) was skipped", took)
	}
}

// downProvider refuses every send as unreachable.
type downProvider struct{ calls atomic.Int32 }

func (p *downProvider) Name() string { return "down" }
func (p *downProvider) Send(context.Context, *mailer.Message) (mailer.Receipt, error) {
	p.calls.Add(1)
	return mailer.Receipt{}, &mailer.SendError{Provider: "down", Class: mailer.ProviderDown, Err: fmt.Errorf("connection refused")}
}

func TestChainFailsOverToTheNextProvider(t *testing.T) {
	dir := t.TempDir()
	sandbox, err := maildir.New(dir)
	testenv.Must(t, err, "maildir")
	down := &downProvider{}
	h := newHarness(t, down, sandbox)
	h.publish(t, "55555555-5555-4555-8555-555555555555", "di@example.com", "444444", time.Now().Add(5*time.Minute), "dispatch:e:1")
	d := decode[events.Delivered](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivered.acme", 1, 10*time.Second)[0])
	if d.Provider != "sandbox" || down.calls.Load() != 1 {
		t.Fatalf("delivered via %q after %d calls to the primary", d.Provider, down.calls.Load())
	}
}

func TestUndecodableJobGoesToDLQ(t *testing.T) {
	h := newHarness(t)
	m := nats.NewMsg("otp.dispatch.acme")
	m.Data = []byte(`{"challenge_id":`)
	_, err := h.js.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish")
	dl := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq.acme", 1, 10*time.Second)
	if r := dl[0].Header.Get(events.HeaderDLQReason); !strings.Contains(r, "refused dispatch job") {
		t.Fatalf("DLQ reason = %q", r)
	}
	if got := dl[0].Header.Get(events.HeaderRecipientHash); got != "" {
		t.Errorf("a job that does not open names recipient %q", got)
	}
	if got := testenv.OpenDeadLetter(t, h.dlq, dl[0]); string(got.Data) != `{"challenge_id":` {
		t.Errorf("dead letter holds %q", got.Data)
	}
	// The dead letter is written before the job is terminated, and the work queue drops
	// the job once the server has the termination.
	testenv.Eventually(t, 10*time.Second, "the undecodable job off the work queue", func() bool {
		return len(testenv.Messages(t, h.js, events.StreamDispatch, "")) == 0
	})
}

// TestExhaustedDeliveriesGoToTheDLQ: a job that keeps failing transiently on every
// provider ends with one otp.delivery_failed{permanent:false} and a copy in OTP_DLQ that
// carries the last error.
func TestExhaustedDeliveriesGoToTheDLQ(t *testing.T) {
	down := &downProvider{}
	h := newHarnessConfig(t, Config{MaxDeliver: 3}, func(mailer.Provider) []mailer.Provider { return []mailer.Provider{down} })
	h.publish(t, "66666666-6666-4666-8666-666666666666", "ex@example.com", "777777", time.Now().Add(5*time.Minute), "dispatch:x:1")
	dl := testenv.WaitMessages(t, h.js, events.StreamDLQ, "otp.dlq.acme", 1, 20*time.Second)
	if r := dl[0].Header.Get(events.HeaderDLQReason); !strings.Contains(r, "deliveries exhausted") || !strings.Contains(r, "connection refused") {
		t.Fatalf("DLQ reason = %q", r)
	}
	// The dead letter names the recipient only by subject hash, found inside the sealed
	// job; the job itself rests sealed under the DLQ key, and a redrive gets it back.
	if got := dl[0].Header.Get(events.HeaderRecipientHash); got != h.subjects.Subject("acme", "ex@example.com") {
		t.Errorf("%s = %q, want the recipient's subject hash", events.HeaderRecipientHash, got)
	}
	orig := testenv.OpenDeadLetter(t, h.dlq, dl[0])
	job, err := h.sealer.OpenJob(func() events.SealedDispatch {
		s, err := events.DecodeSealedDispatch(orig.Data)
		testenv.Must(t, err, "decode the dead job")
		return s
	}())
	testenv.Must(t, err, "open the dead job")
	if orig.Subject != "otp.dispatch.acme" || job.Recipient != "ex@example.com" || job.Code != "777777" {
		t.Errorf("redriven job %s %+v", orig.Subject, job)
	}
	f := decode[events.DeliveryFailed](t, testenv.WaitMessages(t, h.js, events.StreamEvents, "otp.delivery_failed.acme", 1, 10*time.Second)[0])
	if f.Permanent || f.Attempts != 3 {
		t.Fatalf("delivery_failed = %+v, want permanent=false after 3 attempts", f)
	}
	if n := len(testenv.Messages(t, h.js, events.StreamDispatch, "")); n != 0 {
		t.Fatalf("the exhausted job is still on the work queue (%d)", n)
	}
}

// TestRateFromTheProviderQuota: with no configured rate, the bucket is set to 80% of the
// quota the provider reports at start (SES GetAccount).
func TestRateFromTheProviderQuota(t *testing.T) {
	h := newHarnessConfig(t, Config{RateSources: map[string]func(context.Context) (float64, error){
		"smtp": func(context.Context) (float64, error) { return 50, nil },
	}}, func(sp mailer.Provider) []mailer.Provider { return []mailer.Provider{sp} })
	testenv.Eventually(t, 10*time.Second, "the rate to be applied", func() bool { return h.svc.guards[0].Limit() == 40 })
}

// TestTenantSenderLocaleAndTemplates: the tenant policy picks the sender, the default
// locale and a template directory.
func TestTenantSenderLocaleAndTemplates(t *testing.T) {
	dir := t.TempDir()
	testenv.Must(t, os.MkdirAll(filepath.Join(dir, "de"), 0o755), "mkdir")
	testenv.Must(t, os.WriteFile(filepath.Join(dir, "de", "subject.txt"), []byte("Acme-Code {{.Code}}"), 0o644), "write")
	policies, err := policy.Parse([]byte(fmt.Sprintf("tenants:\n  acme:\n    sender: \"Acme Login <login@acme.example>\"\n    locale: de\n    code_in_subject: true\n    template_dir: %s\n", dir)))
	testenv.Must(t, err, "policy")
	h := newHarnessConfig(t, Config{Policies: policies}, func(sp mailer.Provider) []mailer.Provider { return []mailer.Provider{sp} })
	h.publishJob(t, events.DispatchJob{ChallengeID: "77777777-7777-4777-8777-777777777777", Tenant: "acme", RequestID: "r", CodeSeq: 1,
		Recipient: "ana@example.com", Purpose: "login", IssuedAt: time.Now().UTC(), ExpiresAt: time.Now().Add(5 * time.Minute),
		Code: "818181"}, "dispatch:t:1") // no locale: the tenant default applies
	mail := h.smtp.WaitFor(t, 1, 10*time.Second)[0]
	body := string(mail.Data)
	if mail.From != "login@acme.example" || !strings.Contains(body, "Subject: Acme-Code 818181") || !strings.Contains(body, "Best=C3=A4tigungscode") {
		t.Fatalf("from %q, mail:\n%s", mail.From, body)
	}
}

func TestRetentionPurge(t *testing.T) {
	h := newHarness(t)
	_, err := h.pool.Exec(context.Background(), `INSERT INTO dispatcher.deliveries (challenge_id, code_seq, tenant, request_id,
		status, attempts, expires_at, claimed_at) VALUES
		('88888888-8888-4888-8888-888888888881', 1, 'acme', 'old', 'sent', 1, now() - interval '25 hours', now() - interval '25 hours'),
		('88888888-8888-4888-8888-888888888882', 1, 'acme', 'new', 'sent', 1, now() + interval '5 minutes', now())`)
	testenv.Must(t, err, "insert")
	n, err := h.svc.Purge(context.Background())
	testenv.Must(t, err, "purge")
	var left string
	testenv.Must(t, h.pool.QueryRow(context.Background(), `SELECT string_agg(request_id, ',') FROM dispatcher.deliveries`).Scan(&left), "read")
	if n != 1 || left != "new" {
		t.Fatalf("purged %d, left %q", n, left)
	}
}
