// Command issuer runs one issuer process, configured by the environment (see README).
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/issuer"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Getenv, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "issuer:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, getenv platform.Getenv, stderr io.Writer) error {
	common, err := platform.LoadCommon(getenv)
	if err != nil {
		return err
	}
	cfg, err := issuer.LoadConfig(getenv, common)
	if err != nil {
		return err
	}
	if err := platform.CheckPolicies(common, cfg.Policies); err != nil {
		return err
	}
	log := platform.NewLogger(stderr, common.LogLevel, "issuer")
	deps, err := platform.Open(ctx, common, "issuer", log)
	if err != nil {
		return err
	}
	defer deps.Close()
	if err := platform.Migrate(ctx, deps.Pool, issuer.Schema, issuer.Migrations(), log); err != nil {
		return err
	}
	svc, err := issuer.New(cfg, deps.Pool, deps.JS, log, deps.Reg)
	if err != nil {
		return err
	}
	return platform.Serve(ctx, common, deps, log, svc.Run)
}
