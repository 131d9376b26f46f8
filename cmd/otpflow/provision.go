package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
)

// provisionCommand is `otpflow provision`, run with an admin identity before the
// services start: it creates or updates the contract's streams and durable consumers on
// NATS (OTP_NATS_URL, OTP_NATS_CREDS / OTP_NATS_NKEY_FILE / user:password in the URL, TLS
// from OTP_NATS_TLS_*) and runs the database migrations as the owner role
// (OTP_MIGRATE_DATABASE_URL), printing each change. With --dry-run it prints what it would
// change and changes nothing. The contract declares no KV bucket. With a NATS server to
// tell, it records itself as otp.operator_action "provision".
func provisionCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("provision", flag.ContinueOnError)
	server, _ := serverFlags(fs)
	var (
		db     = fs.String("db", "", "PostgreSQL URL of an administrator (default OTP_MIGRATE_DATABASE_URL); \"-\": skip the database")
		prefix = fs.String("role-prefix", "", "prefix of the role names (default OTP_DB_ROLE_PREFIX, else "+platform.DefaultRolePrefix+")")
		dryRun = fs.Bool("dry-run", false, "print what would change, change nothing")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	common, err := platform.LoadCommon(getenv) // OTP_NATS_REPLICAS, OTP_REQUESTS_MAX_AGE, TLS
	if err != nil {
		return err
	}
	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return fmt.Errorf("provision: nothing done: %w", err)
	}
	defer nc.Close()
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()

	var changes []platform.Change
	if *dryRun {
		changes, err = platform.Plan(pctx, js, common.Streams())
	} else {
		changes, err = platform.Provision(pctx, js, common.Streams())
	}
	if err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	verb := map[bool]string{true: "would ", false: ""}[*dryRun]
	for _, c := range changes {
		fmt.Fprintln(stdout, verb+c.String())
	}
	if len(changes) == 0 {
		fmt.Fprintln(stdout, "streams and consumers match the contract")
	}

	dbURL := *db
	if dbURL == "" {
		dbURL = getenv("OTP_MIGRATE_DATABASE_URL")
	}
	if *prefix != "" {
		getenv = overlay(getenv, map[string]string{"OTP_DB_ROLE_PREFIX": *prefix})
	}
	p, err := platform.RolePrefix(getenv)
	if err != nil {
		return err
	}
	migrated := "database skipped"
	switch {
	case dbURL == "-":
	case *dryRun:
		behind, err := platform.PendingMigrations(pctx, dbURL, specs()...)
		if err != nil {
			return fmt.Errorf("provision: %w", err)
		}
		for _, b := range behind {
			fmt.Fprintln(stdout, "would migrate "+b)
		}
		if len(behind) == 0 {
			fmt.Fprintln(stdout, "schemas are up to date")
		}
	default:
		if err := migrateAll(pctx, dbURL, p, stdout); err != nil {
			return err
		}
		migrated = "schemas migrated, roles " + p + "*"
	}
	if *dryRun {
		return nil
	}
	detail := fmt.Sprintf("%d stream and consumer changes; %s", len(changes), migrated)
	if err := publishOperatorAction(ctx, js, "provision", systemTenant, detail); err != nil {
		return notAudited("provision", strings.TrimSpace(detail), err)
	}
	return nil
}

// provisionStreams provisions the contract on js for otpflow dev, saying what changed.
func provisionStreams(ctx context.Context, js jetstream.JetStream, o events.StreamOptions, w io.Writer) error {
	changes, err := platform.Provision(ctx, js, o)
	if err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	for _, c := range changes {
		fmt.Fprintln(w, c.String())
	}
	return nil
}
