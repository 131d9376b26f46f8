package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/platform"
)

// DB is a fresh database with a role prefix of its own: services in a test connect to it
// as their own least-privilege roles, as in production.
type DB struct {
	URL    string // the database as the test server's administrator (a superuser): the insider
	Prefix string // OTP_DB_ROLE_PREFIX of the test's roles
}

// NewDB creates a fresh database and picks a role prefix no other test uses; the roles
// made with it are dropped at cleanup, after the database (roles are cluster-wide).
func NewDB(tb testing.TB) DB {
	tb.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	prefix := "t" + hex.EncodeToString(b) + "_"
	tb.Cleanup(func() { dropRoles(tb, prefix) }) // registered first: runs after the database is dropped
	return DB{URL: Database(tb), Prefix: prefix}
}

// Migrate runs `otpflow migrate` for specs: roles, schemas, migrations, grants.
func (d DB) Migrate(tb testing.TB, specs ...platform.ServiceSpec) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	Must(tb, platform.MigrateAll(ctx, platform.MigrateOptions{URL: d.URL, Prefix: d.Prefix}, specs...), "migrate")
}

// RoleURL is the database's URL logged in as the role of service.
func (d DB) RoleURL(service string) string {
	return d.As(platform.ServiceRole(d.Prefix, service))
}

// As is the database's URL logged in as role.
func (d DB) As(role string) string {
	u, err := platform.RoleURL(d.URL, role)
	if err != nil {
		panic(err)
	}
	return u
}

// Pool opens a pool on url, closed at cleanup.
func Pool(tb testing.TB, url string) *pgxpool.Pool {
	tb.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	Must(tb, err, "open pool")
	tb.Cleanup(pool.Close)
	return pool
}

// Postgres migrates spec on a fresh database and opens a pool connected as the service's
// own role, with only the grants of its spec.
func Postgres(tb testing.TB, spec platform.ServiceSpec) *pgxpool.Pool {
	tb.Helper()
	d := NewDB(tb)
	d.Migrate(tb, spec)
	return Pool(tb, d.RoleURL(spec.Name))
}

// Admin opens a pool on pool's database as the test server's administrator: what an
// insider with full database access can do.
func Admin(tb testing.TB, pool *pgxpool.Pool) *pgxpool.Pool {
	tb.Helper()
	u, err := url.Parse(AdminDatabaseURL())
	Must(tb, err, "OTP_TEST_DATABASE_URL")
	u.Path = "/" + pool.Config().ConnConfig.Database
	return Pool(tb, u.String())
}

// dropRoles drops every role named with prefix, with what they own or were granted in
// the administrator's database.
func dropRoles(tb testing.TB, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, AdminDatabaseURL())
	if err != nil {
		tb.Logf("drop roles %s*: %v", prefix, err)
		return
	}
	defer c.Close(ctx)
	rows, err := c.Query(ctx, `SELECT rolname FROM pg_catalog.pg_roles WHERE starts_with(rolname, $1)`, prefix)
	if err != nil {
		tb.Logf("drop roles %s*: %v", prefix, err)
		return
	}
	roles, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		tb.Logf("drop roles %s*: %v", prefix, err)
		return
	}
	for _, r := range roles {
		id := pgx.Identifier{r}.Sanitize()
		if _, err := c.Exec(ctx, "DROP OWNED BY "+id+"; DROP ROLE "+id); err != nil {
			tb.Logf("drop role %s: %v", r, err)
		}
	}
}
