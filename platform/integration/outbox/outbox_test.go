package outbox_test

import (
	"context"
	"io"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/outbox"
	"github.com/otpflow/otpflow/platform/testenv"
)

var migrations = fstest.MapFS{"00001_outbox.sql": {Data: []byte(`-- +goose Up
CREATE TABLE svc.outbox (id bigserial PRIMARY KEY, subject text NOT NULL, header jsonb NOT NULL,
    data bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now());`)}}

// TestRelayPublishesWhatACrashLeftBehind: rows committed but never published (the
// process died after its commit) are published by the relay under their own ids, once.
func TestRelayPublishesWhatACrashLeftBehind(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, platform.ServiceSpec{Name: "svc", Schema: "svc", Migrations: migrations, Grants: platform.ReadWriteGrants("svc")})
	ob := &outbox.Outbox{Table: "svc.outbox", Pool: pool, JS: js, Log: testenv.Logger(io.Discard)}

	msg := func(i int) *nats.Msg {
		m, err := events.NewMsg(events.TypeAlert, "acme", "alert:"+string(rune('a'+i)), "", events.Alert{Tenant: "acme", Rule: "r"}, events.Envelope{Source: "test"})
		testenv.Must(t, err, "msg")
		return m
	}
	var published []outbox.Entry
	err := pgx.BeginFunc(context.Background(), pool, func(tx pgx.Tx) error {
		entries, err := ob.Add(context.Background(), tx, msg(0), msg(1), msg(2))
		published = entries[:1]
		return err
	})
	testenv.Must(t, err, "add")
	// The first is published in line; the process "dies" before the other two.
	testenv.Must(t, ob.Publish(context.Background(), published), "publish")

	testenv.Start(t, func(ctx context.Context) error { return ob.Relay(ctx, 50*time.Millisecond, 0) })
	testenv.WaitMessages(t, js, events.StreamEvents, "otp.alert.acme", 3, 10*time.Second)
	testenv.Eventually(t, 10*time.Second, "an empty outbox", func() bool {
		var n int
		_ = pool.QueryRow(context.Background(), `SELECT count(*) FROM svc.outbox`).Scan(&n)
		return n == 0
	})
	// Publishing an entry again (a relay racing an in-line publish) stores nothing new.
	testenv.Must(t, ob.Publish(context.Background(), published), "publish again")
	if n := len(testenv.Messages(t, js, events.StreamEvents, "otp.alert.acme")); n != 3 {
		t.Fatalf("%d messages, want 3", n)
	}
}

// TestFirstSubjectsAreStoredBeforeTheRest: with First set, a Publish stores the entries
// First takes before it sends the others. While their stream cannot take them, nothing
// else of the Publish is stored: the issuer's job that mails a code never precedes the
// code's otp.challenge, nor the supersession of the code it replaces. The relay, once the
// stream is back, publishes all of them, the first ones first.
func TestFirstSubjectsAreStoredBeforeTheRest(t *testing.T) {
	_, js := testenv.JetStream(t, testenv.NATS(t))
	pool := testenv.Postgres(t, platform.ServiceSpec{Name: "svc", Schema: "svc", Migrations: migrations, Grants: platform.ReadWriteGrants("svc")})
	ob := &outbox.Outbox{Table: "svc.outbox", Pool: pool, JS: js, Log: testenv.Logger(io.Discard),
		First: func(subject string) bool { return strings.HasPrefix(subject, "otp.challenge_superseded.") }}
	ctx := t.Context()

	add := func(id string) []outbox.Entry {
		t.Helper()
		alert, err := events.NewMsg(events.TypeAlert, "acme", "alert:"+id, "", events.Alert{Tenant: "acme", Rule: "r"}, events.Envelope{Source: "test"})
		testenv.Must(t, err, "alert")
		sup, err := events.NewMsg(events.TypeChallengeSuperseded, "acme", "challenge_superseded:"+id, "", events.Superseded{Tenant: "acme"}, events.Envelope{Source: "test"})
		testenv.Must(t, err, "supersession")
		var entries []outbox.Entry
		testenv.Must(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			entries, err = ob.Add(ctx, tx, sup, alert)
			return err
		}), "add")
		return entries
	}

	// Both stored, the first one first.
	testenv.Must(t, ob.Publish(ctx, add("a")), "publish")
	sups := testenv.Messages(t, js, events.StreamChallenges, "otp.challenge_superseded.acme")
	alerts := testenv.Messages(t, js, events.StreamEvents, "otp.alert.acme")
	if len(sups) != 1 || len(alerts) != 1 || alerts[0].Time.Before(sups[0].Time) {
		t.Fatalf("stored %d supersessions and %d alerts; want one each, the supersession first", len(sups), len(alerts))
	}

	// The first entry's stream is gone: the publish fails and stores nothing else.
	testenv.Must(t, js.DeleteStream(ctx, events.StreamChallenges), "delete the stream")
	if err := ob.Publish(ctx, add("b")); err == nil {
		t.Fatal("a publish whose first entry has no stream succeeded")
	}
	if n := len(testenv.Messages(t, js, events.StreamEvents, "otp.alert.acme")); n != 1 {
		t.Fatalf("%d alerts stored while the supersession before them could not be: want the first publish's only", n)
	}
	var left int
	testenv.Must(t, pool.QueryRow(ctx, `SELECT count(*) FROM svc.outbox`).Scan(&left), "outbox")
	if left != 2 {
		t.Fatalf("%d entries left in the outbox, want both of the failed publish", left)
	}

	// The stream is back: the relay publishes both.
	_, err := platform.Provision(ctx, js, events.StreamOptions{})
	testenv.Must(t, err, "provision again")
	testenv.Start(t, func(ctx context.Context) error { return ob.Relay(ctx, 50*time.Millisecond, 0) })
	alerts = testenv.WaitMessages(t, js, events.StreamEvents, "otp.alert.acme", 2, 10*time.Second)
	sups = testenv.Messages(t, js, events.StreamChallenges, "otp.challenge_superseded.acme")
	if len(sups) != 1 || alerts[1].Time.Before(sups[0].Time) {
		t.Fatalf("after the relay: %d supersessions on the new stream, want 1, stored before the alert", len(sups))
	}
}
