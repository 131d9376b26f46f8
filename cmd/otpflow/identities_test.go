package main

import (
	"bytes"
	"context"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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
	logs := &testenv.LogBuffer{}
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

	out.Reset()
	errOut.Reset()
	code, err = run(context.Background(), []string{"erase", "--tenant", "acme", "--recipient", "ana@example.com"}, as("operator"), &out, &errOut)
	if err != nil || code != 0 {
		t.Fatalf("erase as the operator: exit %d, %v\n%s\n%s\nservices:\n%s", code, err, out.String(), errOut.String(), logs.String())
	}
	t.Logf("otpflow erase as the operator:\n%s", out.String())
	for _, want := range []string{"deleted 1 requests from OTP_REQUESTS, 1 codes from OTP_CHALLENGES", "issuer     erased", "dispatcher erased",
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
