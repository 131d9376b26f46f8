package main

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestPipelineUnderIdentities runs the whole pipeline against the NATS server of
// deploy/nats (static nkey users, least-privilege permissions, TLS): the streams and
// consumers are provisioned as the admin, each service runs on its own as its own user
// (OTP_NATS_NKEY_FILE) trusting the test CA (OTP_NATS_TLS_CA), the app is tenant acme's
// user, and the CLI's erase runs as the operator. A permission that a step lacks shows
// here as a service that cannot start or a step that never happens.
func TestPipelineUnderIdentities(t *testing.T) {
	d := testenv.DeployedNATS(t)
	w := newWorldOn(t, d.Server)
	w.env["OTP_NATS_URL"] = d.URL
	w.env["OTP_NATS_TLS_CA"] = d.CA.File
	// Each tenant of the template gets a request stream of its own (deploy/k8s's
	// provisioning job sets the same).
	w.env["OTP_TENANT_STREAMS"] = "acme,globex"
	as := func(id string) func(string) string {
		env := maps.Clone(w.env)
		env["OTP_NATS_NKEY_FILE"] = d.Seeds[id]
		env["OTP_NATS_JS_API_PREFIX"] = testenv.DeployJSAPIPrefix
		if id == "acme" {
			env["OTP_NATS_INBOX_PREFIX"] = "_INBOX_acme"
		}
		return func(k string) string { return env[k] }
	}

	var out, errOut bytes.Buffer
	code, err := run(context.Background(), []string{"provision"}, as("admin"), &out, &errOut)
	if err != nil || code != 0 {
		t.Fatalf("provision as the admin: exit %d, %v\n%s\n%s", code, err, out.String(), errOut.String())
	}
	// The issuer's consumer gives a message up after 2 deliveries 1 s apart here (the
	// contract's 10 of 30 s would take minutes), so the look-alike below is dead-lettered
	// within the test: from the server's advisory, kept on OTP_ADVISORIES, through the
	// issuer's durable there, as deploy/nats grants it.
	adminJS := identityJS(t, d, "admin")
	quick := events.IssuerTenantConsumer("acme")
	quick.AckWait, quick.MaxDeliver = time.Second, 2
	_, err = platform.EnsureConsumer(context.Background(), adminJS, events.StreamRequests, quick)
	testenv.Must(t, err, "tune the issuer's consumer of acme")
	logs := &testenv.LogBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(logs.String())
		}
	})
	for _, s := range specs() {
		getenv := as(s.Name)
		testenv.Start(t, func(ctx context.Context) error { return platform.RunServices(ctx, getenv, logs, s) })
	}

	a := appAs(t, d, "acme")
	// The app's attack first: an empty request with a Status header looks to the JetStream
	// client like the server telling it to stop pulling. The issuer pulls on.
	poison := nats.NewMsg("otp.requested.acme")
	poison.Header.Set("Status", "400")
	poison.Header.Set("Description", "Bad Request")
	_, err = a.js.PublishMsg(context.Background(), poison)
	testenv.Must(t, err, "acme publishes a request that looks like a status")
	checkFlow(t, w, a, "acme", "ids-1", "ana@example.com")

	// Another tenant's app takes the message id the CLI's request below will carry
	// ("requested:<tenant>:<request id>"). On a stream shared by the tenants, JetStream
	// would drop the CLI's request as a duplicate and no mail would come; each tenant's
	// own request stream checks ids among its own messages only.
	g := appAs(t, d, "globex")
	claim := nats.NewMsg("otp.requested.globex")
	claim.Header.Set(jetstream.MsgIDHeader, "requested:acme:ids-cli")
	claim.Data = []byte(`{"request_id":"ids-claim","recipient":"claim@example.com","purpose":"login"}`)
	if ack, err := g.js.PublishMsg(context.Background(), claim); err != nil || ack.Stream != "OTP_REQUESTS_globex" {
		t.Fatalf("globex publishes its own request: %+v, %v", ack, err)
	}

	// The CLI's request and verify as the app's own user.
	for _, args := range [][]string{{"request", "--tenant", "acme", "--request-id", "ids-cli", "--recipient", "cli@example.com"},
		{"verify", "--tenant", "acme", "--request-id", "ids-none", "--code", "000000"}} {
		out.Reset()
		errOut.Reset()
		code, err = run(context.Background(), args, as("acme"), &out, &errOut)
		if err != nil || out.Len() == 0 {
			t.Fatalf("otpflow %v as the app: exit %d, %v\n%s\n%s", args, code, err, out.String(), errOut.String())
		}
		t.Logf("otpflow %v as the app: %s", args, out.String())
	}
	if !strings.Contains(out.String(), `"status":"not_found"`) {
		t.Errorf("verify of an unknown request as the app answered %s", out.String())
	}
	// The issuer still pulls after the look-alike status: the CLI's request is mailed.
	testenv.Eventually(t, 30*time.Second, "the CLI's request mailed", func() bool {
		return len(mailsTo(w.smtp.Mails(), "cli@example.com")) == 1
	})

	// A dead request, sourced from acme's stream without a message id, redriven by the
	// operator: the publish lands on acme's own stream (not OTP_REQUESTS, which captures
	// nothing now), is sourced, issued and mailed, named as the issuer named the original.
	issuerJS := identityJS(t, d, "issuer")
	dead := nats.NewMsg("otp.requested.acme")
	dead.Data = []byte(`{"request_id":"ids-dead","recipient":"dead@example.com","purpose":"login"}`)
	dead.Header.Set(events.HeaderStreamSource, "OTP_REQUESTS_acme 977 > > otp.requested.acme")
	entry := w.deadLetterOf(t, issuerJS, "issuer", "OTP_REQUESTS", 4242, dead, "", "issuer: database refused it")
	// The operator lists the dead letters (in order, by direct gets): this one last.
	out.Reset()
	errOut.Reset()
	code, err = run(context.Background(), []string{"dlq", "list", "--consumer", "issuer"}, as("operator"), &out, &errOut)
	listed := strings.Split(strings.TrimSpace(out.String()), "\n")
	if err != nil || code != 0 || !strings.HasPrefix(listed[len(listed)-1], fmt.Sprint(entry)+"\t") ||
		!strings.Contains(listed[len(listed)-1], "\tissuer\totp.requested.acme\t") {
		t.Fatalf("dlq list as the operator: exit %d, %v\n%s\n%s", code, err, out.String(), errOut.String())
	}
	out.Reset()
	errOut.Reset()
	code, err = run(context.Background(), []string{"dlq", "redrive", fmt.Sprint(entry)}, as("operator"), &out, &errOut)
	if err != nil || code != 0 || !strings.Contains(out.String(), "redriven to OTP_REQUESTS_acme ") {
		t.Fatalf("dlq redrive as the operator: exit %d, %v\n%s\n%s", code, err, out.String(), errOut.String())
	}
	testenv.Eventually(t, 30*time.Second, "the redriven request mailed", func() bool {
		return len(mailsTo(w.smtp.Mails(), "dead@example.com")) == 1
	})
	redriven, err := issuerJS.Stream(context.Background(), "OTP_REQUESTS")
	testenv.Must(t, err, "OTP_REQUESTS as the issuer")
	last, err := redriven.GetLastMsgForSubject(context.Background(), "otp.requested.acme")
	testenv.Must(t, err, "the redriven request on OTP_REQUESTS")
	if got := last.Header.Get(events.HeaderRedriveOf); got != "OTP_REQUESTS_acme:977" {
		t.Errorf("the redrive names the original %q, want the issuer's name for it, OTP_REQUESTS_acme:977", got)
	}

	// The look-alike never reached the issuer's handler; given up by the server, it is
	// dead-lettered by the issuer all the same.
	operatorJS := identityJS(t, d, "operator")
	testenv.Eventually(t, 30*time.Second, "the look-alike dead-lettered by the issuer", func() bool {
		for _, m := range testenv.Messages(t, operatorJS, events.StreamDLQ, "otp.dlq.acme") {
			if m.Header.Get(events.HeaderDLQConsumer) == events.IssuerTenantConsumer("acme").Durable && strings.Contains(m.Header.Get(events.HeaderDLQReason), "Status header") {
				return true
			}
		}
		return false
	})

	out.Reset()
	errOut.Reset()
	code, err = run(context.Background(), []string{"erase", "--tenant", "acme", "--recipient", "ana@example.com"}, as("operator"), &out, &errOut)
	if err != nil || code != 0 {
		t.Fatalf("erase as the operator: exit %d, %v\n%s\n%s\nservices:\n%s", code, err, out.String(), errOut.String(), logs.String())
	}
	t.Logf("otpflow erase as the operator:\n%s", out.String())
	for _, want := range []string{"deleted 1 requests from OTP_REQUESTS_acme\n", "deleted 1 requests from OTP_REQUESTS, 1 codes from OTP_CHALLENGES", "issuer     erased", "dispatcher erased",
		"verifier   erased", "auditor    erased"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("erase output lacks %q:\n%s", want, out.String())
		}
	}
	// The operator's audit commands: replay reads OTP_EVENTS in order, verify checks the
	// chain against the checkpoints on OTP_AUDIT.
	for _, args := range [][]string{{"audit", "replay", "--type", "issued", "--tenant", "acme"}, {"audit", "verify", "--db", w.auditDB}} {
		out.Reset()
		errOut.Reset()
		code, err = run(context.Background(), args, as("operator"), &out, &errOut)
		if err != nil || code != 0 || out.Len() == 0 {
			t.Fatalf("otpflow %v as the operator: exit %d, %v\n%s\n%s", args, code, err, out.String(), errOut.String())
		}
		t.Logf("otpflow %v as the operator:\n%s", args, out.String())
	}
	if strings.Contains(logs.String(), "Permissions Violation") || strings.Contains(logs.String(), "nats async error") {
		t.Errorf("a service was refused something it does:\n%s", logs.String())
	}
}

// appAs is an upstream application connected as tenant's user of deploy/nats, with the
// inbox prefix its permissions allow.
func appAs(t *testing.T, d *testenv.NATSDeployment, tenant string) *app {
	t.Helper()
	opts := append([]nats.Option{nats.CustomInboxPrefix("_INBOX_" + tenant)}, platform.NATSCredentials(d.Common(tenant))...)
	nc, err := nats.Connect(d.URL, opts...)
	testenv.Must(t, err, "connect as the app of %s", tenant)
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	return &app{nc: nc, js: js}
}

// identityJS is JetStream as identity id of deploy/nats (a service, the admin or the
// operator), with its inbox prefix and the deployment's API prefix.
func identityJS(t *testing.T, d *testenv.NATSDeployment, id string) jetstream.JetStream {
	t.Helper()
	inbox := ""
	for _, i := range testenv.DeployIdentities {
		if i.ID == id {
			inbox = i.Inbox
		}
	}
	nc, err := nats.Connect(d.URL, append([]nats.Option{nats.CustomInboxPrefix(inbox)}, platform.NATSCredentials(d.Common(id))...)...)
	testenv.Must(t, err, "connect as %s", id)
	t.Cleanup(nc.Close)
	js, err := platform.NewJetStream(nc, testenv.DeployJSAPIPrefix)
	testenv.Must(t, err, "jetstream as %s", id)
	return js
}
