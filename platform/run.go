package platform

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/otpflow/otpflow/events"
	"github.com/pressly/goose/v3"
	"golang.org/x/sync/errgroup"
)

// The runner: every service binary and `otpflow dev` start services the same way, in
// steps that are functions of their own so that a command can run one alone (`otpflow
// migrate` as an administrator, `otpflow provision` as a JetStream admin):
//
//	LoadCommon, then each ServiceSpec.Load   config; a bad setting stops the start before any connection
//	Open                                     the service's own PostgreSQL pool (as its own role) and NATS connection
//	ServiceSpec.CheckSchema                  its schema is at this build's migration version (MigrateAll, run before, brings it there)
//	Build                                    the service on its connections
//	serve                                    Run (which binds its consumer: Bind), /metrics /healthz /readyz, drain within OTP_SHUTDOWN_TIMEOUT
//
// Provision (streams.go), the contract's streams and durable consumers, is a step of its
// own, run by otpflow provision as a JetStream admin before any service starts: services
// only bind to what exists.

// ServiceSpec is one service as the runner starts it. Each service package has a Spec()
// made with NewServiceSpec.
type ServiceSpec struct {
	Name       string // the log tag, the NATS connection name and inbox prefix
	Schema     string // the PostgreSQL schema the service owns
	Migrations fs.FS  // goose migrations of Schema (*.sql at the root)
	// Grants are what the service's database role may do, each the middle of a GRANT
	// statement ("SELECT, INSERT ON audit.events"); MigrateAll applies them after the
	// migrations and takes back whatever is not listed.
	Grants []string
	// Load reads and checks the service's own settings and returns how to build it. It
	// runs before anything connects.
	Load func(getenv Getenv, common Common) (Build, error)
}

// Build builds a configured service on its connections; its metrics go to d.Reg.
type Build func(d *Deps, log *slog.Logger) (Runner, error)

// Runner is a built service: Run works until ctx is cancelled, then drains what it holds.
type Runner interface {
	Run(ctx context.Context) error
}

// NewServiceSpec ties a service's config loader to its constructor. Its role gets
// ReadWriteGrants of its schema; a service that needs less sets Grants.
func NewServiceSpec[C any](name, schema string, migrations fs.FS,
	load func(Getenv, Common) (C, error), build func(C, *Deps, *slog.Logger) (Runner, error)) ServiceSpec {
	return ServiceSpec{Name: name, Schema: schema, Migrations: migrations, Grants: ReadWriteGrants(schema),
		Load: func(getenv Getenv, common Common) (Build, error) {
			cfg, err := load(getenv, common)
			if err != nil {
				return nil, err
			}
			return func(d *Deps, log *slog.Logger) (Runner, error) { return build(cfg, d, log) }, nil
		}}
}

// CheckSchema checks, as the service's own role, that its schema is at the newest
// migration this build knows (or newer): services never migrate, `otpflow migrate` does.
func (s ServiceSpec) CheckSchema(ctx context.Context, pool *pgxpool.Pool) error {
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, db, s.Migrations, goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return fmt.Errorf("migrations of %s: %w", s.Schema, err)
	}
	var want int64
	for _, src := range p.ListSources() {
		want = max(want, src.Version)
	}
	var have int64
	err = pool.QueryRow(ctx, "SELECT coalesce(max(version_id), 0) FROM "+pgx.Identifier{s.Schema, "goose_db_version"}.Sanitize()).Scan(&have)
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "3F000"):
		return fmt.Errorf("schema %s is not migrated, this build needs version %d: run otpflow migrate", s.Schema, want)
	case errors.As(err, &pgErr) && pgErr.Code == "42501":
		return fmt.Errorf("schema %s: this database user has no grant on it: run otpflow migrate with this OTP_DB_ROLE_PREFIX, and connect as role <prefix>%s", s.Schema, s.Name)
	case err != nil:
		return fmt.Errorf("schema %s: %w", s.Schema, err)
	case have < want:
		return fmt.Errorf("schema %s is at version %d, this build needs %d: run otpflow migrate", s.Schema, have, want)
	}
	return nil
}

// connectedAsOwner reports whether pool is logged in as a superuser or as a role that may
// act as the owner of the service's schema: one that could drop its triggers.
func (s ServiceSpec) connectedAsOwner(ctx context.Context, pool *pgxpool.Pool) (bool, error) {
	var mighty bool
	err := pool.QueryRow(ctx, `SELECT r.rolsuper OR pg_catalog.pg_has_role(current_user, n.nspowner, 'USAGE')
		FROM pg_catalog.pg_roles r, pg_catalog.pg_namespace n WHERE r.rolname = current_user AND n.nspname = $1`, s.Schema).Scan(&mighty)
	return mighty, err
}

// Streams are the stream options of this deployment (OTP_NATS_REPLICAS,
// OTP_REQUESTS_MAX_AGE).
func (c Common) Streams() events.StreamOptions {
	return events.StreamOptions{Replicas: c.Replicas, RequestsMaxAge: c.RequestsMaxAge,
		Tenants: c.TenantStreams, TenantRequestsMaxBytes: c.TenantRequestsMaxBytes}
}

// Main is a service binary's main: it runs spec configured by the environment until
// SIGINT or SIGTERM and it has drained; an error is one line on stderr, "name: ...", and
// exit status 1. The garbage collector gets DefaultGOGC and DefaultMemoryLimit unless
// GOGC or GOMEMLIMIT is set.
func Main(spec ServiceSpec) {
	gcDefaults(os.Getenv)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := RunService(ctx, spec, os.Getenv, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, spec.Name+":", err)
		os.Exit(1)
	}
}

// RunService runs one service, as its binary does, until ctx is cancelled and it has
// drained. Errors are for one line on stderr, e.g. "OTP_CODE_PEPPER: ...".
func RunService(ctx context.Context, spec ServiceSpec, getenv Getenv, logw io.Writer) error {
	return RunServices(ctx, getenv, logw, spec)
}

// RunServices runs services in this process, each with its own connections, and one
// /metrics /healthz /readyz endpoint for them all (OTP_HTTP_ADDR), until ctx is cancelled
// and each has drained, or one fails. With more than one service, errors name the
// service they come from.
func RunServices(ctx context.Context, getenv Getenv, logw io.Writer, specs ...ServiceSpec) error {
	if len(specs) == 0 {
		return errors.New("no service to run")
	}
	named := func(s ServiceSpec, err error) error {
		if err == nil || len(specs) == 1 {
			return err
		}
		return fmt.Errorf("%s: %w", s.Name, err)
	}
	common, err := LoadCommon(getenv)
	if err != nil {
		return err
	}
	builds := make([]Build, len(specs))
	for i, s := range specs {
		if builds[i], err = s.Load(getenv, common); err != nil {
			return err
		}
	}

	reg := NewRegistry() // one per process: one /metrics
	checks := map[string]Check{}
	logs := make([]*slog.Logger, len(specs))
	deps := make([]*Deps, len(specs))
	for i, s := range specs {
		logs[i] = NewLogger(logw, common.LogLevel, s.Name)
		c := common
		if u := getenv(DatabaseURLVar(s.Name)); u != "" {
			c.DatabaseURL = u
		}
		tp, shutdown, err := NewTracerProvider(ctx, getenv, s.Name)
		if err != nil {
			return named(s, err)
		}
		defer stopTraces(shutdown) // once drained, so its last spans go out
		d, err := Open(ctx, c, s.Name, logs[i])
		if err != nil {
			return named(s, err)
		}
		defer d.Close()
		d.Reg, d.Tracer, deps[i] = reg, tp.Tracer("otpflow/"+s.Name), d
		for name, c := range d.Checks() {
			if len(specs) > 1 {
				name = s.Name + "-" + name
			}
			checks[name] = c
		}
		if err := s.CheckSchema(ctx, d.Pool); err != nil {
			return named(s, err)
		}
		if mighty, err := s.connectedAsOwner(ctx, d.Pool); err == nil && mighty {
			logs[i].Warn("connected as a superuser or a member of the schema's owner: run the service as its own role (otpflow migrate, docs/roles.md)", "schema", s.Schema)
		}
	}
	runs := make([]func(context.Context) error, len(specs))
	for i, s := range specs {
		svc, err := builds[i](deps[i], logs[i])
		if err != nil {
			return named(s, err)
		}
		runs[i] = svc.Run
	}
	opsLog := logs[0]
	if len(specs) > 1 {
		opsLog = NewLogger(logw, common.LogLevel, "otpflow")
	}
	ops := OpsHandler(reg, checks)
	if common.Pprof {
		ops = WithPprof(ops)
	}
	return serve(ctx, common, ops, opsLog, runs)
}

// serve runs every run function and, when OTP_HTTP_ADDR is set, the ops endpoint, until
// ctx is cancelled and all have stopped, or one fails. A shutdown that outlasts
// OTP_SHUTDOWN_TIMEOUT is abandoned: unacknowledged messages are redelivered to another
// instance.
func serve(ctx context.Context, c Common, ops http.Handler, log *slog.Logger, runs []func(context.Context) error) error {
	g, gctx := errgroup.WithContext(ctx)
	for _, run := range runs {
		g.Go(func() error { return run(gctx) })
	}
	if c.HTTPAddr != "" {
		g.Go(func() error { return ServeOps(gctx, c.HTTPAddr, ops, log, nil) })
	}
	done := make(chan error, 1)
	go func() { done <- g.Wait() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	select {
	case err := <-done:
		return err
	case <-time.After(c.ShutdownTimeout):
		return errors.New("shutdown timed out; unfinished messages will be redelivered")
	}
}

// PendingMigrations connects to url (an administrator's) and names each schema of specs
// that is behind this build's migrations ("issuer: version 3 -> 4"), without migrating:
// the dry run of otpflow provision.
func PendingMigrations(ctx context.Context, url string, specs ...ServiceSpec) ([]string, error) {
	pool, err := OpenPostgres(ctx, url)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	var out []string
	for _, s := range specs {
		if err := s.CheckSchema(ctx, pool); err != nil {
			out = append(out, s.Schema+": "+strings.TrimSuffix(err.Error(), ": run otpflow migrate"))
		}
	}
	return out, nil
}
