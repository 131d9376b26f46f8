package testenv

import (
	"testing"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// DLQKey returns a fresh OTP_DLQ_KEY ring of one key, id "d1".
func DLQKey(tb testing.TB) *keys.Sealer {
	tb.Helper()
	s, err := keys.ParseSealer(keys.Generate("d1", 32))
	Must(tb, err, "DLQ key")
	return s
}

// OpenDeadLetter opens a dead letter read from OTP_DLQ with sealer, as a redrive would,
// and fails the test if it does not open.
func OpenDeadLetter(tb testing.TB, sealer *keys.Sealer, m *jetstream.RawStreamMsg) events.DeadLetter {
	tb.Helper()
	dl, err := platform.OpenDeadLetter(sealer, m.Header, m.Data)
	Must(tb, err, "open dead letter %s", m.Header.Get(jetstream.MsgIDHeader))
	return dl
}
