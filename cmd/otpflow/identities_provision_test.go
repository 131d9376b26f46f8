package main

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// provision creates the contract's streams and every durable consumer as the identity
// getenv names (the admin).
func provision(t *testing.T, getenv func(string) string) {
	t.Helper()
	nc, js, err := connectJetStream(getenv("OTP_NATS_URL"), getenv)
	testenv.Must(t, err, "connect as the admin")
	defer nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	testenv.Must(t, platform.EnsureStreams(ctx, js, events.StreamOptions{}), "provision streams")
	for _, c := range []struct {
		stream string
		cfg    jetstream.ConsumerConfig
	}{
		{events.StreamRequests, events.IssuerConsumer},
		{events.StreamDispatch, events.DispatcherConsumer},
		{events.StreamChallenges, events.VerifierConsumer},
		{events.StreamEvents, events.VerifierLegacyConsumer},
		{events.StreamEvents, events.AuditorConsumer},
		{events.StreamEvents, events.ErasureConsumer("issuer")},
		{events.StreamEvents, events.ErasureConsumer("dispatcher")},
		{events.StreamEvents, events.ErasureConsumer("verifier")},
	} {
		_, err := platform.EnsureConsumer(ctx, js, c.stream, c.cfg)
		testenv.Must(t, err, "provision consumer %s on %s", c.cfg.Durable, c.stream)
	}
}
