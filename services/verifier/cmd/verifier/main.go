// Command verifier runs one verifier process, configured by the environment (see README).
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/verifier"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Getenv, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "verifier:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, getenv platform.Getenv, stderr io.Writer) error {
	common, err := platform.LoadCommon(getenv)
	if err != nil {
		return err
	}
	cfg, err := verifier.LoadConfig(getenv, common)
	if err != nil {
		return err
	}
	if err := platform.CheckPolicies(common, cfg.Policies); err != nil {
		return err
	}
	log := platform.NewLogger(stderr, common.LogLevel, "verifier")
	deps, err := platform.Open(ctx, common, "verifier", log)
	if err != nil {
		return err
	}
	defer deps.Close()
	if err := platform.Migrate(ctx, deps.Pool, verifier.Schema, verifier.Migrations(), log); err != nil {
		return err
	}
	svc, err := verifier.New(cfg, deps.Pool, deps.NC, deps.JS, log, deps.Reg)
	if err != nil {
		return err
	}
	return platform.Serve(ctx, common, deps, log, svc.Run)
}
