package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// WaitDrained waits until the durable consumer on stream has settled everything up to
// stream sequence last: its acknowledgement floor at or past it, nothing pending, nothing
// waiting for an acknowledgement or a redelivery. It returns the consumer's info.
func WaitDrained(tb testing.TB, js jetstream.JetStream, stream, durable string, last uint64, timeout time.Duration) *jetstream.ConsumerInfo {
	tb.Helper()
	cons, err := js.Consumer(context.Background(), stream, durable)
	Must(tb, err, "consumer %s on %s", durable, stream)
	deadline := time.Now().Add(timeout)
	for {
		info, err := cons.Info(context.Background())
		if err == nil && info.AckFloor.Stream >= last && info.NumPending == 0 && info.NumAckPending == 0 && info.NumRedelivered == 0 {
			return info
		}
		if time.Now().After(deadline) {
			if err != nil {
				tb.Fatalf("consumer %s not drained up to %d after %v: %v", durable, last, timeout, err)
			}
			tb.Fatalf("consumer %s not drained up to %d after %v: ack floor %d, %d pending, %d waiting for an ack, %d redelivered",
				durable, last, timeout, info.AckFloor.Stream, info.NumPending, info.NumAckPending, info.NumRedelivered)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
