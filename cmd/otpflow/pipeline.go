package main

import (
	"context"
	"io"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/auditor"
	"github.com/otpflow/otpflow/services/dispatcher"
	"github.com/otpflow/otpflow/services/issuer"
	"github.com/otpflow/otpflow/services/verifier"
)

// runPipeline runs the four services in this process, each with its own NATS and
// PostgreSQL connections, configured from getenv and started exactly as the separate
// binaries are (platform's runner), with one /metrics /healthz /readyz for them all.
func runPipeline(ctx context.Context, getenv platform.Getenv, logw io.Writer) error {
	return platform.RunServices(ctx, getenv, logw, issuer.Spec(), dispatcher.Spec(), verifier.Spec(), auditor.Spec())
}
