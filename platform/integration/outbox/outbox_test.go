package outbox_test

import (
	"context"
	"io"
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
