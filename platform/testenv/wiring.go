package testenv

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// JetStream connects to s and returns the connection and its JetStream context, with the
// contract's streams and durable consumers provisioned.
func JetStream(tb testing.TB, s *server.Server) (*nats.Conn, jetstream.JetStream) {
	tb.Helper()
	return JetStreamReplicas(tb, s, 1)
}

// Logger returns a debug JSON logger writing to w.
func Logger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// Start runs run in the background until the returned stop is called (also at cleanup),
// and fails the test if it returns an error.
func Start(tb testing.TB, run func(context.Context) error) (stop func()) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				tb.Errorf("service: %v", err)
			}
		case <-time.After(30 * time.Second):
			tb.Error("service did not stop within 30s")
		}
	}
	tb.Cleanup(stop)
	return stop
}

// Messages reads every message stored on stream whose subject matches filter ("" = all),
// in stream order, with leader reads (read-after-write coherent).
func Messages(tb testing.TB, js jetstream.JetStream, stream, filter string) []*jetstream.RawStreamMsg {
	tb.Helper()
	ctx := context.Background()
	st, err := js.Stream(ctx, stream)
	Must(tb, err, "stream %s", stream)
	info, err := st.Info(ctx)
	Must(tb, err, "stream info")
	var out []*jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		Must(tb, err, "get message %d", seq)
		if filter == "" || server.SubjectsCollide(filter, m.Subject) {
			out = append(out, m)
		}
	}
	return out
}

// WaitMessages waits until stream holds at least n messages matching filter.
func WaitMessages(tb testing.TB, js jetstream.JetStream, stream, filter string, n int, timeout time.Duration) []*jetstream.RawStreamMsg {
	tb.Helper()
	var got []*jetstream.RawStreamMsg
	Eventually(tb, timeout, "messages on "+filter, func() bool {
		got = Messages(tb, js, stream, filter)
		return len(got) >= n
	})
	return got
}
