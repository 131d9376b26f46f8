package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/auditor"
	"github.com/otpflow/otpflow/services/dispatcher"
	"github.com/otpflow/otpflow/services/issuer"
	"github.com/otpflow/otpflow/services/verifier"
)

// specs are the four services, in the order they are migrated and started.
func specs() []platform.ServiceSpec {
	return []platform.ServiceSpec{issuer.Spec(), dispatcher.Spec(), verifier.Spec(), auditor.Spec()}
}

// migrateCommand is `otpflow migrate`: as an administrator, it creates the roles, the
// schemas (owned by the owner role), applies every migration and leaves each service's
// role its grants, printing what it did.
func migrateCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	db := fs.String("db", "", "PostgreSQL URL of an administrator that may create roles and schemas (default OTP_MIGRATE_DATABASE_URL; unset: the libpq defaults)")
	prefix := fs.String("role-prefix", "", "prefix of the role names (default OTP_DB_ROLE_PREFIX, else "+platform.DefaultRolePrefix+")")
	natsFlag := fs.String("nats", "", "NATS URL to record the migration on as otp.operator_action (default OTP_NATS_URL; neither: not recorded)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// Operators are audited: with a NATS server to tell, migrate connects before it acts
	// (no connection, nothing done) and records what it did after. A first deployment
	// migrates before anything runs on NATS; then it says it is not recorded.
	natsAt := *natsFlag
	if natsAt == "" {
		natsAt = getenv("OTP_NATS_URL")
	}
	var js jetstream.JetStream
	if natsAt != "" {
		var nc *nats.Conn
		var err error
		if nc, js, err = connectJetStream(natsAt, getenv); err != nil {
			return fmt.Errorf("migrate: nothing done: %w", err)
		}
		defer nc.Close()
	}
	if *db == "" {
		*db = getenv("OTP_MIGRATE_DATABASE_URL")
	}
	if *prefix != "" {
		getenv = overlay(getenv, map[string]string{"OTP_DB_ROLE_PREFIX": *prefix})
	}
	p, err := platform.RolePrefix(getenv)
	if err != nil {
		return err
	}
	if err := migrateAll(ctx, *db, p, stdout); err != nil {
		return err
	}
	if js == nil {
		fmt.Fprintln(stdout, "not recorded on OTP_EVENTS: no NATS server given (--nats or OTP_NATS_URL)")
		return nil
	}
	names := make([]string, 0, 4)
	for _, s := range specs() {
		names = append(names, s.Schema)
	}
	detail := fmt.Sprintf("schemas %s up to date; roles %s*", strings.Join(names, ", "), p)
	if err := publishOperatorAction(ctx, js, "migrate", systemTenant, detail); err != nil {
		return notAudited("migrate", "migrated", err)
	}
	return nil
}

// migrateAll migrates the four services on url with role prefix p and says what it did
// on w.
func migrateAll(ctx context.Context, url, p string, w io.Writer) error {
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey) {
			return slog.Attr{}
		}
		return a
	}}))
	all := specs()
	if err := platform.MigrateAll(ctx, platform.MigrateOptions{URL: url, Prefix: p, Log: log}, all...); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	roles := make([]string, len(all))
	for i, s := range all {
		roles[i] = platform.ServiceRole(p, s.Name)
	}
	fmt.Fprintf(w, "migrated; schemas owned by %s; services connect as %s\n", platform.OwnerRole(p), strings.Join(roles, ", "))
	return nil
}

// overlay is getenv with the values of m first.
func overlay(getenv func(string) string, m map[string]string) func(string) string {
	return func(k string) string {
		if v, ok := m[k]; ok {
			return v
		}
		return getenv(k)
	}
}
