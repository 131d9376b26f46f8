package main

import (
	"context"
	"io"

	"github.com/otpflow/otpflow/platform"
)

// runPipeline runs the four services in this process, each with its own NATS and
// PostgreSQL connections, configured from getenv and started exactly as the separate
// binaries are (platform's runner), with one /metrics /healthz /readyz for them all.
func runPipeline(ctx context.Context, getenv platform.Getenv, logw io.Writer) error {
	return platform.RunServices(ctx, getenv, logw, specs()...)
}
