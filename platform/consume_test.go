package platform

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go"
)

// TestFailureOf is the table from which the consumer decides between dead-lettering a
// message, waiting for a neighbour and retrying: data the database refuses is the
// message's; a database or NATS that is down, refuses the service or collides is no
// message's; anything else names no cause.
func TestFailureOf(t *testing.T) {
	pg := func(code string) error { return fmt.Errorf("project 3 events: %w", &pgconn.PgError{Code: code}) }
	for _, c := range []struct {
		name string
		err  error
		want failureKind
	}{
		{"a value out of range", pg("22003"), failureRefused},
		{"not a uuid", pg("22P02"), failureRefused},
		{"a NUL in jsonb", pg("22P05"), failureRefused},
		{"a check constraint", pg("23514"), failureRefused},
		{"a unique violation", pg("23505"), failureRefused},
		{"a row too big", pg("54000"), failureRefused},
		{"connection failure", pg("08006"), failureUnavailable},
		{"admin shutdown", pg("57P01"), failureUnavailable},
		{"starting up", pg("57P03"), failureUnavailable},
		{"too many connections", pg("53300"), failureUnavailable},
		{"serialization failure", pg("40001"), failureUnavailable},
		{"deadlock", pg("40P01"), failureUnavailable},
		{"a standby", pg("25006"), failureUnavailable},
		{"grants revoked", pg("42501"), failureUnavailable},
		{"login refused", pg("28000"), failureUnavailable},
		{"a trigger raising", pg("P0001"), failureUnknown},
		{"a statement cancelled", pg("57014"), failureUnknown},
		{"a syntax error", pg("42601"), failureUnknown},
		{"connection refused", &pgconn.ConnectError{}, failureUnavailable},
		{"a dial error", fmt.Errorf("issue: %w", &net.OpError{Op: "dial", Err: errors.New("connection refused")}), failureUnavailable},
		{"a connection cut mid-answer", fmt.Errorf("write rows: %w", io.ErrUnexpectedEOF), failureUnavailable},
		{"a publish that timed out", fmt.Errorf("publish: %w", context.DeadlineExceeded), failureUnavailable},
		{"NATS gone", fmt.Errorf("publish: %w", nats.ErrConnectionClosed), failureUnavailable},
		{"no JetStream answer", fmt.Errorf("publish: %w", nats.ErrNoResponders), failureUnavailable},
		{"marked by the handler", fmt.Errorf("the store: %w", ErrUnavailable), failureUnavailable},
		{"a plain error", errors.New("something else"), failureUnknown},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := failureOf(c.err); got != c.want {
				t.Errorf("failureOf(%v) = %d, want %d", c.err, got, c.want)
			}
		})
	}
}

// TestOnNeighbour: a failure that names no cause is put on the message when another
// delivery succeeded meanwhile or the neighbour answers its probe, else on the neighbour;
// a neighbour down is never put on the message; the probe is asked only when it decides.
func TestOnNeighbour(t *testing.T) {
	unknown, down := errors.New("something else"), fmt.Errorf("x: %w", &pgconn.ConnectError{})
	for _, c := range []struct {
		name             string
		err              error
		handled, healthy bool
		want, probed     bool
	}{
		{"unknown, a neighbour handled", unknown, true, false, false, false},
		{"unknown, none handled, the database answers", unknown, false, true, false, true},
		{"unknown, none handled, the database down", unknown, false, false, true, true},
		{"down, a neighbour handled", down, true, true, true, false},
		{"down, the database answers its probe", down, false, true, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			probed := false
			got := onNeighbour(c.err, c.handled, func() bool { probed = true; return c.healthy })
			if got != c.want || probed != c.probed {
				t.Errorf("onNeighbour = %v (probed %v), want %v (probed %v)", got, probed, c.want, c.probed)
			}
		})
	}
}
