package platform

import (
	"io"
	"log/slog"
)

// NewLogger returns a JSON logger at level ("debug", "info", "warn", "error") tagged with
// the service name. Services log ids, never payloads: payloads carry email addresses and,
// on one hop, a sealed code.
func NewLogger(w io.Writer, level, svc string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l})).With("svc", svc)
}
