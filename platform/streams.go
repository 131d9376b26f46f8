package platform

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// Provisioning: the contract's streams and durable consumers, created from the configs
// events declares as data. Provision is a step of its own (see run.go) for a command that
// only provisions; a service starts with Bind.

// setupTimeout bounds one setup step at start: provisioning the streams, creating a
// service's consumer.
const setupTimeout = 30 * time.Second

// Bind is how a service starts on JetStream: the contract's streams as Provision makes them
// (idempotent, so that a service started alone, as tests do, finds them) and the service's
// durable consumer on stream, within the setup timeout. Once streams are provisioned
// under an admin identity, this is where a service binds to what exists instead.
func Bind(ctx context.Context, js jetstream.JetStream, o events.StreamOptions, stream string, cc jetstream.ConsumerConfig) (jetstream.Consumer, error) {
	setup, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	if err := EnsureStreams(setup, js, o); err != nil {
		return nil, err
	}
	return EnsureConsumer(setup, js, stream, cc)
}

// EnsureStreams creates or updates the contract's streams (events.StreamConfigs). It is
// idempotent, so replicas starting together may all call it.
func EnsureStreams(ctx context.Context, js jetstream.JetStream, o events.StreamOptions) error {
	for _, cfg := range events.StreamConfigs(o) {
		if err := untilAnswered(ctx, func(ctx context.Context) error {
			_, err := js.CreateOrUpdateStream(ctx, cfg)
			return err
		}); err != nil {
			return fmt.Errorf("ensure stream %s: %w", cfg.Name, err)
		}
	}
	return nil
}

// EnsureConsumer creates or updates a durable consumer on stream, e.g.
// events.IssuerConsumer on events.StreamRequests.
func EnsureConsumer(ctx context.Context, js jetstream.JetStream, stream string, cfg jetstream.ConsumerConfig) (jetstream.Consumer, error) {
	var cons jetstream.Consumer
	err := untilAnswered(ctx, func(ctx context.Context) error {
		var err error
		cons, err = js.CreateOrUpdateConsumer(ctx, stream, cfg)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("ensure consumer %s on %s: %w", cfg.Durable, stream, err)
	}
	return cons, nil
}

// untilAnswered retries a JetStream API call, each with a short timeout, until the server
// answers it or ctx ends: a call sent before a cluster has elected its meta leader may
// never be answered, or be answered 503. Any other answer (e.g. a config the server
// refuses) ends the retries.
func untilAnswered(ctx context.Context, call func(context.Context) error) error {
	b := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(2*time.Second), backoff.WithMaxElapsedTime(0))
	var last error
	err := backoff.Retry(func() error {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		last = call(callCtx)
		var apiErr *jetstream.APIError
		if errors.As(last, &apiErr) && apiErr.Code != 503 {
			return backoff.Permanent(last)
		}
		return last
	}, backoff.WithContext(b, ctx))
	if err != nil && ctx.Err() != nil && last != nil && !errors.Is(last, ctx.Err()) {
		return errors.Join(last, ctx.Err()) // why it kept failing, and why it stopped
	}
	return err
}
