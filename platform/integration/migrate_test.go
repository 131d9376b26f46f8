package platform_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// svcSpec is a service whose schema has versions migrations, each adding a table.
func svcSpec(name string, versions int) platform.ServiceSpec {
	fsys := fstest.MapFS{}
	for v := 1; v <= versions; v++ {
		fsys[strings.Repeat("0", 4)+string(rune('0'+v))+"_t.sql"] = &fstest.MapFile{
			Data: []byte("-- +goose Up\nCREATE TABLE " + name + ".t" + string(rune('0'+v)) + " (id bigserial PRIMARY KEY, v int);\n")}
	}
	return platform.ServiceSpec{Name: name, Schema: name, Migrations: fsys, Grants: platform.ReadWriteGrants(name)}
}

func wantSQLState(t *testing.T, err error, code, what string) {
	t.Helper()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != code {
		t.Errorf("%s: got %v, want SQLSTATE %s", what, err, code)
	}
}

// TestMigrateAllMakesLeastPrivilegeRoles: the owner role cannot log in and owns the schema;
// the service's role reads and writes its tables, and can neither change them, nor write
// its migration version, nor read another service's schema. Migrating again changes
// nothing, and takes back a grant no longer in the spec.
func TestMigrateAllMakesLeastPrivilegeRoles(t *testing.T) {
	ctx := context.Background()
	d := testenv.NewDB(t)
	a, b := svcSpec("svc_a", 1), svcSpec("svc_b", 1)
	d.Migrate(t, a, b)
	d.Migrate(t, a, b) // idempotent

	admin := testenv.Pool(t, d.URL)
	var ownerLogin, svcLogin bool
	var schemaOwner, tableOwner string
	testenv.Must(t, admin.QueryRow(ctx, `SELECT (SELECT rolcanlogin FROM pg_roles WHERE rolname = $1), (SELECT rolcanlogin FROM pg_roles WHERE rolname = $2),
		(SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'svc_a'), (SELECT tableowner FROM pg_tables WHERE schemaname = 'svc_a' AND tablename = 't1')`,
		platform.OwnerRole(d.Prefix), platform.ServiceRole(d.Prefix, "svc_a")).Scan(&ownerLogin, &svcLogin, &schemaOwner, &tableOwner), "roles")
	if ownerLogin || !svcLogin || schemaOwner != platform.OwnerRole(d.Prefix) || tableOwner != schemaOwner {
		t.Fatalf("owner login %v, service login %v, schema owner %s, table owner %s", ownerLogin, svcLogin, schemaOwner, tableOwner)
	}

	svc := testenv.Pool(t, d.RoleURL("svc_a"))
	_, err := svc.Exec(ctx, `INSERT INTO svc_a.t1 (v) VALUES (1); UPDATE svc_a.t1 SET v = 2; SELECT * FROM svc_a.t1; DELETE FROM svc_a.t1`)
	testenv.Must(t, err, "read and write its own table")
	for _, tc := range []struct{ name, sql, code string }{
		{"alter its table", `ALTER TABLE svc_a.t1 ADD COLUMN x int`, "42501"},
		{"drop its table", `DROP TABLE svc_a.t1`, "42501"},
		{"truncate its table", `TRUNCATE svc_a.t1`, "42501"},
		{"create a table in its schema", `CREATE TABLE svc_a.mine (id int)`, "42501"},
		{"write its migration version", `DELETE FROM svc_a.goose_db_version`, "42501"},
		{"read another service's schema", `SELECT * FROM svc_b.t1`, "42501"},
		{"become the owner", `SET ROLE ` + platform.OwnerRole(d.Prefix), "42501"},
	} {
		_, err := svc.Exec(ctx, tc.sql)
		wantSQLState(t, err, tc.code, tc.name)
	}

	// A grant dropped from the spec is taken back by the next migrate.
	a.Grants = []string{"USAGE ON SCHEMA svc_a", "SELECT ON ALL TABLES IN SCHEMA svc_a"}
	d.Migrate(t, a)
	_, err = svc.Exec(ctx, `INSERT INTO svc_a.t1 (v) VALUES (1)`)
	wantSQLState(t, err, "42501", "insert after the grant was dropped")
}

// TestMigrateAllHandsOverAnOlderSchema: a schema migrated before the roles existed (here by
// another owner) is handed to the owner role, with its tables, and migrates on.
func TestMigrateAllHandsOverAnOlderSchema(t *testing.T) {
	ctx := context.Background()
	d := testenv.NewDB(t)
	d.Migrate(t, svcSpec("svc", 1))
	later := testenv.DB{URL: d.URL, Prefix: d.Prefix + "v2_"} // dropped with d's roles
	later.Migrate(t, svcSpec("svc", 2))
	var owners []string
	rows, err := testenv.Pool(t, d.URL).Query(ctx, `SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'svc'
		UNION SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'svc'`)
	testenv.Must(t, err, "owners")
	for rows.Next() {
		var o string
		testenv.Must(t, rows.Scan(&o), "scan")
		owners = append(owners, o)
	}
	if len(owners) != 1 || owners[0] != platform.OwnerRole(later.Prefix) {
		t.Fatalf("owners %v, want only %s", owners, platform.OwnerRole(later.Prefix))
	}
	_, err = testenv.Pool(t, later.RoleURL("svc")).Exec(ctx, `INSERT INTO svc.t1 (v) VALUES (1); INSERT INTO svc.t2 (v) VALUES (1)`)
	testenv.Must(t, err, "the new role writes both tables")
}

// TestServiceRefusesASchemaItCannotRun: services never migrate; one whose schema is behind
// its build, or not there, stops at start with one line that says what to run.
func TestServiceRefusesASchemaItCannotRun(t *testing.T) {
	ns := testenv.NATS(t)
	d := testenv.NewDB(t)
	d.Migrate(t, svcSpec("svc", 1))
	for _, tc := range []struct {
		name string
		spec platform.ServiceSpec
		want string
	}{
		{"behind", svcSpec("svc", 2), "schema svc is at version 1, this build needs 2: run otpflow migrate"},
		{"missing", svcSpec("other", 1), "schema other is not migrated, this build needs version 1: run otpflow migrate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"OTP_NATS_URL": ns.ClientURL(), "OTP_DATABASE_URL": d.RoleURL("svc")}
			spec := tc.spec
			spec.Load = func(platform.Getenv, platform.Common) (platform.Build, error) {
				return func(*platform.Deps, *slog.Logger) (platform.Runner, error) { return nil, errors.New("built") }, nil
			}
			err := platform.RunService(t.Context(), spec, func(k string) string { return env[k] }, io.Discard)
			if err == nil || err.Error() != tc.want {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

// TestRolePrefixAndRoleURL: the prefix is a plain identifier; a role URL keeps the
// server and database and drops the administrator's password.
func TestRolePrefixAndRoleURL(t *testing.T) {
	for _, p := range []string{"otpflow_", "ci_42_"} {
		if got, err := platform.RolePrefix(func(string) string { return p }); err != nil || got != p {
			t.Errorf("RolePrefix(%q) = %q, %v", p, got, err)
		}
	}
	for _, p := range []string{"Otp", "1x", `a"; DROP ROLE x; --`, "a-b", strings.Repeat("a", 41)} {
		if _, err := platform.RolePrefix(func(string) string { return p }); err == nil {
			t.Errorf("RolePrefix(%q) accepted", p)
		}
	}
	if got, _ := platform.RolePrefix(func(string) string { return "" }); got != platform.DefaultRolePrefix {
		t.Errorf("default prefix %q", got)
	}
	for in, want := range map[string]string{
		"postgres://admin:secret@db.internal:5433/otp?sslmode=require": "postgres://otpflow_issuer@db.internal:5433/otp?sslmode=require",
		"host=db.internal dbname=otp user=admin password='se cret'":    "host=db.internal dbname=otp user=admin user=otpflow_issuer",
		"": "user=otpflow_issuer",
	} {
		got, err := platform.RoleURL(in, "otpflow_issuer")
		if err != nil || got != want {
			t.Errorf("RoleURL(%q) = %q, %v; want %q", in, got, err, want)
		}
		if cfg, err := pgconn.ParseConfig(got); err != nil || cfg.User != "otpflow_issuer" || cfg.Password != "" {
			t.Errorf("RoleURL(%q) connects as %q (password %v), %v", in, cfg.User, cfg.Password != "", err)
		}
	}
}

// TestServiceWarnsWhenItCouldDropItsTriggers: a service connected as a superuser (or as a
// member of its schema's owner) runs, and says in its log that it should not.
func TestServiceWarnsWhenItCouldDropItsTriggers(t *testing.T) {
	ns := testenv.NATS(t)
	d := testenv.NewDB(t)
	d.Migrate(t, svcSpec("svc", 1))
	for _, tc := range []struct {
		url  string
		warn bool
	}{{d.URL, true}, {d.RoleURL("svc"), false}} {
		env := map[string]string{"OTP_NATS_URL": ns.ClientURL(), "OTP_DATABASE_URL": tc.url}
		spec := svcSpec("svc", 1)
		spec.Load = func(platform.Getenv, platform.Common) (platform.Build, error) {
			return func(*platform.Deps, *slog.Logger) (platform.Runner, error) { return nil, errors.New("built") }, nil
		}
		var logs testenv.LogBuffer
		if err := platform.RunService(t.Context(), spec, func(k string) string { return env[k] }, &logs); err == nil || err.Error() != "built" {
			t.Fatalf("err = %v, want the build reached", err)
		}
		if got := strings.Contains(logs.String(), "run the service as its own role"); got != tc.warn {
			t.Errorf("connected as %s: warned %v, want %v\n%s", tc.url, got, tc.warn, logs.String())
		}
	}
}

// TestMigrateAllNormalisesServiceRoles: whatever a service role was given outside migrate
// is taken back by the next migrate: attributes (CREATEROLE, CREATEDB), memberships (in
// pg_write_all_data, the owner, another service's role), grants in another service's
// schema and the owner's default privileges for it there, and temporary objects or tables
// in schema public, which no service role may create.
func TestMigrateAllNormalisesServiceRoles(t *testing.T) {
	ctx := context.Background()
	d := testenv.NewDB(t)
	a, b := svcSpec("svc_a", 1), svcSpec("svc_b", 1)
	d.Migrate(t, a, b)
	roleA, roleB, owner := platform.ServiceRole(d.Prefix, "svc_a"), platform.ServiceRole(d.Prefix, "svc_b"), platform.OwnerRole(d.Prefix)
	admin := testenv.Pool(t, d.URL)
	_, err := admin.Exec(ctx, `ALTER ROLE `+roleA+` CREATEROLE CREATEDB;
		GRANT pg_write_all_data, `+owner+`, `+roleB+` TO `+roleA+`;
		GRANT USAGE ON SCHEMA svc_b TO `+roleA+`; GRANT SELECT, DELETE ON svc_b.t1 TO `+roleA+`;
		ALTER DEFAULT PRIVILEGES FOR ROLE `+owner+` IN SCHEMA svc_b GRANT SELECT ON TABLES TO `+roleA+`;
		ALTER DEFAULT PRIVILEGES FOR ROLE `+owner+` GRANT ALL ON TABLES TO `+roleA+`;
		DO $$ BEGIN EXECUTE format('GRANT CREATE, TEMPORARY ON DATABASE %I TO `+roleA+`', current_database()); END $$;
		GRANT CREATE ON SCHEMA public TO PUBLIC`)
	testenv.Must(t, err, "powers given by hand")
	d.Migrate(t, a, b)

	var extra int
	testenv.Must(t, admin.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_roles WHERE rolname = $1 AND (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls))
		+ (SELECT count(*) FROM pg_auth_members WHERE member = $1::regrole)
		+ (SELECT count(*) FROM pg_default_acl, aclexplode(defaclacl) x WHERE x.grantee = $1::regrole)`, roleA).Scan(&extra), "role")
	if extra != 0 {
		t.Errorf("%d attributes, memberships or default privileges left to %s", extra, roleA)
	}
	t.Cleanup(func() { admin.Exec(context.Background(), `DROP DATABASE IF EXISTS `+d.Prefix+`mine`) }) // made only if an attack succeeds
	svc, err := testenv.Pool(t, d.RoleURL("svc_a")).Acquire(ctx)
	testenv.Must(t, err, "connect as svc_a")
	defer svc.Release()
	for _, tc := range []struct{ name, sql string }{
		{"read another service's table", `SELECT * FROM svc_b.t1`},
		{"delete from another service's table", `DELETE FROM svc_b.t1`},
		{"become the owner", `SET ROLE ` + owner},
		{"become another service", `SET ROLE ` + roleB},
		{"create a role", `CREATE ROLE ` + d.Prefix + `mine`},
		{"create a database", `CREATE DATABASE ` + d.Prefix + `mine`},
		{"create a temporary table", `CREATE TEMP TABLE mine (id int)`},
		{"create a type in its temporary schema", `CREATE DOMAIN pg_temp.bytea AS pg_catalog.bytea`},
		{"create a table in schema public", `CREATE TABLE public.mine (id int)`},
		{"create a schema", `CREATE SCHEMA mine`},
	} {
		_, err := svc.Exec(ctx, tc.sql)
		wantSQLState(t, err, "42501", tc.name)
		_, err = svc.Exec(ctx, `RESET ROLE`) // after a SET ROLE that should have failed
		testenv.Must(t, err, "reset role")
	}
	_, err = svc.Exec(ctx, `INSERT INTO svc_a.t1 (v) VALUES (1)`)
	testenv.Must(t, err, "its own grants stay")
}
