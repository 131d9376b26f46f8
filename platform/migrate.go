package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
)

// Database roles. `otpflow migrate`, connected as an administrator
// (OTP_MIGRATE_DATABASE_URL), makes them; each service then connects as its own role:
//
//	<prefix>owner     NOLOGIN; owns every schema, table and function, runs the migrations,
//	                  and is the identity of the audit log's SECURITY DEFINER functions
//	<prefix><service> LOGIN; only what its ServiceSpec.Grants list
//
// The prefix (OTP_DB_ROLE_PREFIX, default "otpflow_") keeps deployments, and parallel test
// databases, on one server apart: roles are cluster-wide, schemas are per database.

// DefaultRolePrefix is the role prefix when OTP_DB_ROLE_PREFIX is unset.
const DefaultRolePrefix = "otpflow_"

// rolePrefix leaves room for the longest role name within PostgreSQL's 63 bytes.
var rolePrefix = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,39}$`)

// RolePrefix reads OTP_DB_ROLE_PREFIX: lower-case letters, digits and underscores, starting
// with a letter or an underscore, at most 40 characters.
func RolePrefix(getenv Getenv) (string, error) {
	p := strings.TrimSpace(getenv("OTP_DB_ROLE_PREFIX"))
	if p == "" {
		return DefaultRolePrefix, nil
	}
	if !rolePrefix.MatchString(p) {
		return "", &ConfigError{"OTP_DB_ROLE_PREFIX", "must be 1-40 of a-z, 0-9 and _, not starting with a digit"}
	}
	return p, nil
}

// OwnerRole is the role that owns the schemas of a deployment with this role prefix.
func OwnerRole(prefix string) string { return prefix + "owner" }

// ServiceRole is the role a service logs in as.
func ServiceRole(prefix, service string) string { return prefix + service }

// ReadWriteGrants is what a service that keeps its own state needs in schema: its
// tables read and written, its sequences drawn from. Never DDL, TRUNCATE or ownership.
func ReadWriteGrants(schema string) []string {
	return []string{
		"USAGE ON SCHEMA " + schema,
		"SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA " + schema,
		"USAGE, SELECT ON ALL SEQUENCES IN SCHEMA " + schema,
	}
}

// DatabaseURLVar is the variable that overrides OTP_DATABASE_URL for one service, so that
// a process running several (otpflow dev) connects each as its own role, e.g.
// OTP_ISSUER_DATABASE_URL.
func DatabaseURLVar(service string) string {
	return "OTP_" + strings.ToUpper(service) + "_DATABASE_URL"
}

// RoleURL is the database URL u (a postgres:// URL or a key=value DSN; empty: the libpq
// defaults) with user role and without u's password: the same server and database,
// logged in as role.
func RoleURL(u, role string) (string, error) {
	if strings.HasPrefix(u, "postgres://") || strings.HasPrefix(u, "postgresql://") {
		p, err := url.Parse(u)
		if err != nil {
			return "", errors.New("the database URL does not parse")
		}
		p.User = url.User(role)
		q := p.Query()
		if q.Has("password") || q.Has("user") {
			q.Del("password")
			q.Del("user")
			p.RawQuery = q.Encode()
		}
		return p.String(), nil
	}
	s := strings.TrimSpace(dsnPassword.ReplaceAllString(u, ""))
	return strings.TrimSpace(s + " user=" + role), nil
}

// MigrateOptions says where and for whom MigrateAll works.
type MigrateOptions struct {
	URL    string // an administrator that may create roles and schemas (OTP_MIGRATE_DATABASE_URL)
	Prefix string // role prefix (OTP_DB_ROLE_PREFIX)
	// Log receives what was done, one line each: roles created, migrations applied,
	// grants. Nil discards it.
	Log *slog.Logger
}

// MigrateAll is `otpflow migrate`: it creates (once) the owner role and each service's
// role, each spec's schema owned by the owner, applies the specs' goose migrations as the
// owner, and leaves each service's role exactly the grants of its spec. It can run again
// at any time, and with several specs at once. A schema made before the roles existed
// (owned by whoever migrated it) is handed to the owner role first. Roles found already
// there are normalised (ensureRole), and the database is closed to temporary objects and
// to creating in schema public (closeDatabase): a role is never reused as it is found.
func MigrateAll(ctx context.Context, o MigrateOptions, specs ...ServiceSpec) error {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	owner := OwnerRole(o.Prefix)
	cfg, err := pgxpool.ParseConfig(o.URL)
	if err != nil {
		return &ConfigError{"OTP_MIGRATE_DATABASE_URL", "not a PostgreSQL URL or DSN"}
	}
	cfg.MaxConns = 2
	admin, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("open PostgreSQL: %w", err)
	}
	defer admin.Close()
	if err := admin.Ping(ctx); err != nil {
		return fmt.Errorf("connect to PostgreSQL at %s:%d/%s: %w", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database, err)
	}
	if err := ensureRole(ctx, admin, log, owner, "NOLOGIN"); err != nil {
		return err
	}
	services := make([]string, len(specs))
	for i, s := range specs {
		services[i] = ServiceRole(o.Prefix, s.Name)
		if err := ensureRole(ctx, admin, log, services[i], "LOGIN"); err != nil {
			return err
		}
	}
	if err := closeDatabase(ctx, admin, log, services); err != nil {
		return err
	}
	// The administrator acts as the owner (SET ROLE); a superuser needs no membership.
	var super bool
	if err := admin.QueryRow(ctx, `SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user`).Scan(&super); err != nil {
		return err
	}
	if !super {
		if _, err := admin.Exec(ctx, "GRANT "+ident(owner)+" TO CURRENT_USER"); err != nil {
			return fmt.Errorf("make the migrating user a member of %s: %w", owner, err)
		}
	}
	for _, s := range specs {
		if err := ensureSchema(ctx, admin, log, s.Schema, owner); err != nil {
			return err
		}
	}

	ownerCfg := cfg.Copy()
	ownerCfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, "SET ROLE "+ident(owner))
		return err
	}
	asOwner, err := pgxpool.NewWithConfig(ctx, ownerCfg)
	if err != nil {
		return err
	}
	defer asOwner.Close()
	db := stdlib.OpenDBFromPool(asOwner)
	defer db.Close()
	for _, s := range specs {
		if err := migrate(ctx, db, s.Schema, s.Migrations, log); err != nil {
			return err
		}
	}
	for _, s := range specs {
		if err := grant(ctx, asOwner, log, s, ServiceRole(o.Prefix, s.Name), owner, services); err != nil {
			return err
		}
	}
	return nil
}

func ident(name string) string { return pgx.Identifier{name}.Sanitize() }

// ensureRole creates role with attr (LOGIN or NOLOGIN) unless it exists, and then makes
// sure it has attr and nothing more: a role that existed before (made by hand, or left by
// an older deployment) is normalised on every run — no SUPERUSER, CREATEDB, CREATEROLE,
// REPLICATION or BYPASSRLS, and a member of no other role (pg_write_all_data, the owner,
// another service's role...). What it may do is then only what grant gives it.
func ensureRole(ctx context.Context, admin *pgxpool.Pool, log *slog.Logger, role, attr string) error {
	if err := createRole(ctx, admin, log, role, attr); err != nil {
		return err
	}
	return normaliseRole(ctx, admin, log, role)
}

func createRole(ctx context.Context, admin *pgxpool.Pool, log *slog.Logger, role, attr string) error {
	var exists bool
	if err := admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)`, role).Scan(&exists); err != nil {
		return err
	}
	if !exists {
		_, err := admin.Exec(ctx, "CREATE ROLE "+ident(role)+" "+attr)
		var pgErr *pgconn.PgError
		switch {
		case err == nil:
			log.Info("created role", "role", role, "attributes", attr)
			return nil
		case errors.As(err, &pgErr) && pgErr.Code == "42710": // created meanwhile by another migrate
		default:
			return fmt.Errorf("create role %s: %w", role, err)
		}
	}
	if _, err := admin.Exec(ctx, "ALTER ROLE "+ident(role)+" "+attr); err != nil {
		return fmt.Errorf("role %s: %w", role, err)
	}
	return nil
}

// normaliseRole takes from role every attribute beyond LOGIN and every role membership it
// holds, and checks that none is left (a membership granted by another role may need a
// superuser to take back).
func normaliseRole(ctx context.Context, admin *pgxpool.Pool, log *slog.Logger, role string) error {
	var super, createDB, createRole, replication, bypassRLS bool
	if err := admin.QueryRow(ctx, `SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls
		FROM pg_catalog.pg_roles WHERE rolname = $1`, role).Scan(&super, &createDB, &createRole, &replication, &bypassRLS); err != nil {
		return fmt.Errorf("role %s: %w", role, err)
	}
	// Only what is set is taken back: changing SUPERUSER, REPLICATION or BYPASSRLS needs a
	// superuser, and an administrator with only CREATEROLE should not fail on a clean role.
	var attrs []string
	for _, a := range []struct {
		set  bool
		name string
	}{{super, "NOSUPERUSER"}, {createDB, "NOCREATEDB"}, {createRole, "NOCREATEROLE"}, {replication, "NOREPLICATION"}, {bypassRLS, "NOBYPASSRLS"}} {
		if a.set {
			attrs = append(attrs, a.name)
		}
	}
	if len(attrs) > 0 {
		if _, err := admin.Exec(ctx, "ALTER ROLE "+ident(role)+" "+strings.Join(attrs, " ")); err != nil {
			return fmt.Errorf("take %s from role %s: %w", strings.Join(attrs, " "), role, err)
		}
		log.Warn("took attributes from a role that had them", "role", role, "attributes", strings.Join(attrs, " "))
	}
	memberships := func() ([][2]string, error) {
		rows, err := admin.Query(ctx, `SELECT pg_catalog.pg_get_userbyid(m.roleid), pg_catalog.pg_get_userbyid(m.grantor)
			FROM pg_catalog.pg_auth_members m WHERE m.member = $1::regrole ORDER BY 1, 2`, role)
		if err != nil {
			return nil, err
		}
		return pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
			var m [2]string
			err := r.Scan(&m[0], &m[1])
			return m, err
		})
	}
	held, err := memberships()
	if err != nil {
		return fmt.Errorf("memberships of %s: %w", role, err)
	}
	for _, m := range held {
		q := "REVOKE " + ident(m[0]) + " FROM " + ident(role) + " GRANTED BY " + ident(m[1]) + " CASCADE"
		if _, err := admin.Exec(ctx, q); err != nil {
			return fmt.Errorf("take membership of %s from %s: %w", m[0], role, err)
		}
		log.Warn("took a role membership from a role that had it", "role", role, "member_of", m[0])
	}
	if left, err := memberships(); err != nil {
		return fmt.Errorf("memberships of %s: %w", role, err)
	} else if len(left) > 0 {
		return fmt.Errorf("role %s is still a member of %s: revoke it as a superuser", role, left[0][0])
	}
	return nil
}

// closeDatabase takes from PUBLIC the right to create temporary objects in the database
// (a temporary schema could shadow the types an audit function declares) and to create
// in schema public, and from each service role any CREATE or TEMPORARY it was granted on
// the database. It refuses to go on when a service role may still create temporary
// objects: the administrator is then neither the database's owner nor a superuser.
func closeDatabase(ctx context.Context, admin *pgxpool.Pool, log *slog.Logger, services []string) error {
	var db string
	var public bool
	if err := admin.QueryRow(ctx, `SELECT current_database(),
		EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'public')`).Scan(&db, &public); err != nil {
		return err
	}
	stmts := []string{"REVOKE TEMPORARY ON DATABASE " + ident(db) + " FROM PUBLIC"}
	if public {
		stmts = append(stmts, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
	}
	for _, r := range services {
		stmts = append(stmts, "REVOKE CREATE, TEMPORARY ON DATABASE "+ident(db)+" FROM "+ident(r))
		if public {
			stmts = append(stmts, "REVOKE CREATE ON SCHEMA public FROM "+ident(r))
		}
	}
	for _, q := range stmts {
		if _, err := admin.Exec(ctx, q); err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
	}
	for _, r := range services {
		var temp, create bool
		if err := admin.QueryRow(ctx, `SELECT pg_catalog.has_database_privilege($1, pg_catalog.current_database(), 'TEMPORARY'),
			pg_catalog.has_database_privilege($1, pg_catalog.current_database(), 'CREATE')`, r).Scan(&temp, &create); err != nil {
			return err
		}
		if temp || create {
			return fmt.Errorf("role %s may still create objects in database %s (temporary: %v): run otpflow migrate as the database's owner or a superuser", r, db, temp)
		}
	}
	log.Info("closed the database", "database", db, "revoked", "TEMPORARY from PUBLIC, CREATE on schema public from PUBLIC")
	return nil
}

// ensureSchema creates schema owned by owner, or hands an existing schema and everything
// in it to owner.
func ensureSchema(ctx context.Context, admin *pgxpool.Pool, log *slog.Logger, schema, owner string) error {
	var current *string
	if err := admin.QueryRow(ctx, `SELECT pg_catalog.pg_get_userbyid(nspowner) FROM pg_catalog.pg_namespace WHERE nspname = $1`,
		schema).Scan(&current); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return err
	}
	if current == nil {
		_, err := admin.Exec(ctx, "CREATE SCHEMA "+ident(schema)+" AUTHORIZATION "+ident(owner))
		var pgErr *pgconn.PgError
		if err != nil && !(errors.As(err, &pgErr) && (pgErr.Code == "42P06" || pgErr.Code == "23505")) {
			return fmt.Errorf("create schema %s: %w", schema, err)
		}
		if err == nil {
			log.Info("created schema", "schema", schema, "owner", owner)
		}
	}
	// Objects not owned by owner: made before the roles existed, by the user that migrated
	// them. Sequences owned by a column follow their table.
	rows, err := admin.Query(ctx, `
		SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
			pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname)
		FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND c.relowner <> $2::regrole
			AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::regclass
				AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
		UNION ALL
		SELECT 'FUNCTION', p.oid::regprocedure::text
		FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = $1 AND p.proowner <> $2::regrole`, schema, owner)
	if err != nil {
		return err
	}
	type object struct{ Kind, Name string }
	objects, err := pgx.CollectRows(rows, pgx.RowToStructByPos[object])
	if err != nil {
		return err
	}
	if current != nil && *current != owner {
		objects = append([]object{{"SCHEMA", ident(schema)}}, objects...)
	}
	for _, obj := range objects {
		if _, err := admin.Exec(ctx, "ALTER "+obj.Kind+" "+obj.Name+" OWNER TO "+ident(owner)); err != nil {
			return fmt.Errorf("hand %s %s to %s: %w", strings.ToLower(obj.Kind), obj.Name, owner, err)
		}
		log.Info("handed to the owner role", "object", strings.ToLower(obj.Kind)+" "+obj.Name, "owner", owner)
	}
	return nil
}

// grant leaves role exactly the grants of s in its schema (and reading its migration
// version, which the service checks at start), in one transaction, so that a grant
// removed from a spec is taken back by the next migrate. Functions of the schema are
// closed to PUBLIC: a function is called only by the role it is granted to.
//
// Every service role in services (this one and the others) first loses whatever it had in
// the schema, and the owner's default privileges there: a grant made by hand to another
// service's role does not outlive a migrate.
func grant(ctx context.Context, asOwner *pgxpool.Pool, log *slog.Logger, s ServiceSpec, role, owner string, services []string) error {
	schema, r := ident(s.Schema), ident(role)
	all := make([]string, 0, len(services)+1)
	all = append(all, r)
	for _, o := range services {
		if o != role {
			all = append(all, ident(o))
		}
	}
	rs := strings.Join(all, ", ")
	stmts := []string{
		"REVOKE ALL ON ALL TABLES IN SCHEMA " + schema + " FROM " + rs,
		"REVOKE ALL ON ALL SEQUENCES IN SCHEMA " + schema + " FROM " + rs,
		"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA " + schema + " FROM PUBLIC, " + rs,
		"REVOKE ALL ON SCHEMA " + schema + " FROM PUBLIC, " + rs,
	}
	for _, kind := range []string{"TABLES", "SEQUENCES", "FUNCTIONS", "TYPES"} {
		stmts = append(stmts,
			"ALTER DEFAULT PRIVILEGES FOR ROLE "+ident(owner)+" IN SCHEMA "+schema+" REVOKE ALL ON "+kind+" FROM "+rs,
			"ALTER DEFAULT PRIVILEGES FOR ROLE "+ident(owner)+" REVOKE ALL ON "+kind+" FROM "+rs)
	}
	for _, g := range s.Grants {
		stmts = append(stmts, "GRANT "+g+" TO "+r)
	}
	version := schema + ".goose_db_version"
	stmts = append(stmts, "GRANT USAGE ON SCHEMA "+schema+" TO "+r,
		"REVOKE ALL ON "+version+" FROM "+r, "GRANT SELECT ON "+version+" TO "+r)
	err := pgx.BeginFunc(ctx, asOwner, func(tx pgx.Tx) error {
		for _, q := range stmts {
			if _, err := tx.Exec(ctx, q); err != nil {
				return fmt.Errorf("%s: %w", q, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("grants of %s: %w", role, err)
	}
	log.Info("granted", "role", role, "schema", s.Schema, "grants", strings.Join(s.Grants, "; "))
	return nil
}
