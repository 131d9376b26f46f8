package platform

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
)

// Deps are the connections one service holds: its PostgreSQL pool, its NATS connection,
// the registry its metrics go to and the tracer its spans go to (trace.go).
type Deps struct {
	Pool   *pgxpool.Pool
	NC     *nats.Conn
	JS     jetstream.JetStream
	Reg    *prometheus.Registry
	Tracer trace.Tracer
}

// Open connects service svc to PostgreSQL and NATS. A service may start before its
// neighbours (a compose file, a rolling restart): it retries with exponential backoff
// for up to c.ConnectTimeout, logging each wait, then gives up with the last error.
//
// With OTP_ENV=production it refuses, before connecting, a PostgreSQL connection that may
// be unencrypted to a remote host, and, once connected, a plaintext NATS connection to
// a remote server (see production.go).
func Open(ctx context.Context, c Common, svc string, log *slog.Logger) (*Deps, error) {
	if c.Production() {
		if err := CheckPostgresTLS(c.DatabaseURL); err != nil {
			return nil, err
		}
	}
	pool, err := retryConnect(ctx, c.ConnectTimeout, log, "PostgreSQL", func() (*pgxpool.Pool, error) {
		return OpenPostgresPool(ctx, c.DatabaseURL, c.DBMaxConns)
	})
	if err != nil {
		return nil, err
	}
	nc, err := retryConnect(ctx, c.ConnectTimeout, log, "NATS", func() (*nats.Conn, error) {
		return ConnectNATS(c, svc, log)
	})
	if err != nil {
		pool.Close()
		return nil, err
	}
	if c.Production() {
		host, state := NATSPeer(nc)
		if err := CheckNATSTLS(host, state, c.NATSPlaintextOK); err != nil {
			nc.Close()
			pool.Close()
			return nil, err
		}
	}
	js, err := NewJetStream(nc, c.NATSJSAPIPrefix)
	if err != nil {
		nc.Close()
		pool.Close()
		return nil, err
	}
	return &Deps{Pool: pool, NC: nc, JS: js, Reg: NewRegistry()}, nil
}

func retryConnect[T any](ctx context.Context, timeout time.Duration, log *slog.Logger, what string, connect func() (T, error)) (T, error) {
	b := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(timeout))
	return backoff.RetryNotifyWithData(func() (T, error) {
		v, err := connect()
		var cfgErr *ConfigError
		if errors.As(err, &cfgErr) {
			return v, backoff.Permanent(err) // waiting does not fix a bad setting
		}
		return v, err
	}, backoff.WithContext(b, ctx), func(err error, wait time.Duration) {
		log.Warn("waiting for "+what, "retry_in", wait.Round(time.Millisecond), "err", err)
	})
}

// Close drains the NATS connection (pending publishes and replies go out) and closes the
// pool. It is the last step of a graceful shutdown.
func (d *Deps) Close() {
	if d.NC != nil {
		closed := make(chan struct{})
		d.NC.SetClosedHandler(func(*nats.Conn) { close(closed) })
		if err := d.NC.Drain(); err == nil {
			select {
			case <-closed:
			case <-time.After(10 * time.Second):
				d.NC.Close()
			}
		} else {
			d.NC.Close()
		}
	}
	if d.Pool != nil {
		d.Pool.Close()
	}
}

// Checks are the readiness checks of the connections.
func (d *Deps) Checks() map[string]Check {
	return map[string]Check{
		"postgres": func(ctx context.Context) error { return d.Pool.Ping(ctx) },
		"nats": func(context.Context) error {
			if !d.NC.IsConnected() {
				return errors.New("not connected")
			}
			return nil
		},
	}
}

// SetupError is what Run returns when its setup failed: nothing when the service was
// told to stop meanwhile (a shutdown during start is not a failure), else err.
func SetupError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return err
}
