package main

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"log/slog"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/auditor"
	"github.com/otpflow/otpflow/services/dispatcher"
	"github.com/otpflow/otpflow/services/issuer"
	"github.com/otpflow/otpflow/services/verifier"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
)

// runner is one service of the pipeline as it is started in-process.
type runner struct {
	name       string
	schema     string
	migrations fs.FS
	build      func(d *platform.Deps, log *slog.Logger, reg prometheus.Registerer) (func(context.Context) error, error)
}

// runPipeline runs the four services in this process, each with its own NATS and
// PostgreSQL connections, configured from getenv exactly as the separate binaries are.
func runPipeline(ctx context.Context, getenv platform.Getenv, logw io.Writer) error {
	common, err := platform.LoadCommon(getenv)
	if err != nil {
		return err
	}
	icfg, err := issuer.LoadConfig(getenv, common)
	if err != nil {
		return err
	}
	dcfg, err := dispatcher.LoadConfig(getenv, common)
	if err != nil {
		return err
	}
	vcfg, err := verifier.LoadConfig(getenv, common)
	if err != nil {
		return err
	}
	acfg, err := auditor.LoadConfig(getenv, common)
	if err != nil {
		return err
	}
	runners := []runner{
		{"issuer", issuer.Schema, issuer.Migrations(), func(d *platform.Deps, log *slog.Logger, reg prometheus.Registerer) (func(context.Context) error, error) {
			s, err := issuer.New(icfg, d.Pool, d.JS, log, reg)
			if err != nil {
				return nil, err
			}
			return s.Run, nil
		}},
		{"dispatcher", dispatcher.Schema, dispatcher.Migrations(), func(d *platform.Deps, log *slog.Logger, reg prometheus.Registerer) (func(context.Context) error, error) {
			s, err := dispatcher.New(dcfg, d.Pool, d.JS, log, reg)
			if err != nil {
				return nil, err
			}
			return s.Run, nil
		}},
		{"verifier", verifier.Schema, verifier.Migrations(), func(d *platform.Deps, log *slog.Logger, reg prometheus.Registerer) (func(context.Context) error, error) {
			s, err := verifier.New(vcfg, d.Pool, d.NC, d.JS, log, reg)
			if err != nil {
				return nil, err
			}
			return s.Run, nil
		}},
		{"auditor", auditor.Schema, auditor.Migrations(), func(d *platform.Deps, log *slog.Logger, reg prometheus.Registerer) (func(context.Context) error, error) {
			s, err := auditor.New(acfg, d.Pool, d.JS, log, reg)
			if err != nil {
				return nil, err
			}
			return s.Run, nil
		}},
	}

	reg := platform.NewRegistry()
	checks := map[string]platform.Check{}
	var runs []func(context.Context) error
	for _, r := range runners {
		log := platform.NewLogger(logw, common.LogLevel, r.name)
		d, err := platform.Open(ctx, common, r.name, log)
		if err != nil {
			return fmt.Errorf("%s: %w", r.name, err)
		}
		defer d.Close()
		if err := platform.Migrate(ctx, d.Pool, r.schema, r.migrations, log); err != nil {
			return fmt.Errorf("%s: %w", r.name, err)
		}
		run, err := r.build(d, log, reg)
		if err != nil {
			return err
		}
		runs = append(runs, run)
		for name, c := range d.Checks() {
			checks[r.name+"-"+name] = c
		}
	}

	g, gctx := errgroup.WithContext(ctx)
	for _, run := range runs {
		g.Go(func() error { return run(gctx) })
	}
	if common.HTTPAddr != "" {
		g.Go(func() error {
			return platform.ServeOps(gctx, common.HTTPAddr, platform.OpsHandler(reg, checks), platform.NewLogger(logw, common.LogLevel, "otpflow"), nil)
		})
	}
	return g.Wait()
}
