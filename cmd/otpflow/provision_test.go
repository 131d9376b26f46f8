package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestProvisionCommand: otpflow provision, as an admin, on an empty NATS server and an
// empty database. The dry run names every stream, consumer and schema it would make and
// makes none; the real run makes them, migrates, and records itself as
// otp.operator_action "provision"; a second run finds nothing to change.
func TestProvisionCommand(t *testing.T) {
	s := testenv.NATS(t)
	d := testenv.NewDB(t)
	env := map[string]string{"OTP_NATS_URL": s.ClientURL(), "OTP_MIGRATE_DATABASE_URL": d.URL, "OTP_DB_ROLE_PREFIX": d.Prefix}
	getenv := func(k string) string { return env[k] }
	provision := func(args ...string) string {
		t.Helper()
		var out bytes.Buffer
		code, err := run(context.Background(), append([]string{"provision"}, args...), getenv, &out, io.Discard)
		if code != 0 || err != nil {
			t.Fatalf("otpflow provision %v: exit %d, %v\n%s", args, code, err, out.String())
		}
		return out.String()
	}
	nc, err := nats.Connect(s.ClientURL())
	testenv.Must(t, err, "connect")
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")

	dry := provision("--dry-run")
	for _, want := range []string{"would create stream OTP_REQUESTS", "would create stream OTP_CHALLENGES",
		"would create consumer dispatcher on OTP_DISPATCH", "would create consumer verifier-erasure on OTP_EVENTS",
		"would migrate issuer: schema issuer is not migrated", "would migrate audit: schema audit is not migrated"} {
		if !strings.Contains(dry, want) {
			t.Errorf("dry run lacks %q:\n%s", want, dry)
		}
	}
	if _, err := js.Stream(context.Background(), events.StreamRequests); err == nil {
		t.Fatal("the dry run created a stream")
	}

	out := provision()
	if !strings.Contains(out, "create consumer issuer on OTP_REQUESTS") || !strings.Contains(out, "migrated; schemas owned by "+d.Prefix+"owner") {
		t.Fatalf("provision:\n%s", out)
	}
	for _, sc := range events.ConsumerConfigs(events.StreamOptions{}) {
		if _, err := js.Consumer(context.Background(), sc.Stream, sc.Config.Durable); err != nil {
			t.Errorf("consumer %s on %s not provisioned: %v", sc.Config.Durable, sc.Stream, err)
		}
	}
	msgs := testenv.Messages(t, js, events.StreamEvents, events.TypeOperatorAction.Wildcard())
	var a events.OperatorAction
	if len(msgs) != 1 || json.Unmarshal(msgs[0].Data, &a) != nil || a.Action != "provision" ||
		!strings.Contains(a.Detail, "stream and consumer changes; schemas migrated") {
		t.Fatalf("operator actions: %d, %+v", len(msgs), a)
	}
	if again := provision("--dry-run"); !strings.Contains(again, "streams and consumers match the contract") ||
		!strings.Contains(again, "schemas are up to date") {
		t.Fatalf("dry run after provisioning:\n%s", again)
	}
}

// TestServicesOnlyBind: the services started on a NATS server nobody provisioned stop at
// start with one line naming what is missing, and create no stream.
func TestServicesOnlyBind(t *testing.T) {
	w := newWorld(t)
	bare := testenv.NATS(t)
	w.env["OTP_NATS_URL"] = bare.ClientURL()
	err := runPipeline(context.Background(), w.getenv, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "does not exist: run otpflow provision") {
		t.Fatalf("services on an unprovisioned server: %v", err)
	}
	if strings.Contains(err.Error(), "\n") {
		t.Fatalf("more than one line: %q", err)
	}
	nc, e := nats.Connect(bare.ClientURL())
	testenv.Must(t, e, "connect")
	defer nc.Close()
	js, e := jetstream.New(nc)
	testenv.Must(t, e, "jetstream")
	if names := js.StreamNames(context.Background()); names.Err() == nil {
		for n := range names.Name() {
			t.Errorf("a service created stream %s", n)
		}
	}
}
