package platform

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"log/slog"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/database"
	"github.com/pressly/goose/v3/lock"
)

// OpenPostgres opens a pool on url; an empty url means the libpq environment (PGHOST,
// PGUSER, ...) and its defaults.
func OpenPostgres(ctx context.Context, url string) (*pgxpool.Pool, error) {
	return OpenPostgresPool(ctx, url, 0)
}

// OpenPostgresPool is OpenPostgres with a pool of up to maxConns connections, unless url
// sets pool_max_conns itself; 0 keeps pgx's default (4, or the number of CPUs when more).
// The pool opens connections as they are needed, so an idle service holds few.
func OpenPostgresPool(ctx context.Context, url string, maxConns int) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, &ConfigError{"OTP_DATABASE_URL", "not a PostgreSQL URL or DSN"}
	}
	if maxConns > 0 && !strings.Contains(url, "pool_max_conns") {
		cfg.MaxConns = int32(maxConns)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open PostgreSQL: %w", err)
	}
	pingCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := pool.Ping(pingCtx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect to PostgreSQL at %s:%d/%s: %w", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database,
			ExplainTLS(err, "the CA that sslrootcert names (in OTP_DATABASE_URL, or PGSSLROOTCERT)"))
	}
	return pool, nil
}

// RedactDatabaseURL returns a PostgreSQL URL or key=value DSN fit to print: passwords
// (in the user info, or as password / sslpassword parameters) become "xxxxx".
func RedactDatabaseURL(s string) string {
	if !strings.HasPrefix(s, "postgres://") && !strings.HasPrefix(s, "postgresql://") {
		return dsnPassword.ReplaceAllString(s, "${1}xxxxx")
	}
	u, err := url.Parse(s)
	if err != nil {
		return "(a PostgreSQL URL that does not parse)" // it may hold a password anywhere
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), "xxxxx")
	}
	q := u.Query()
	for _, k := range []string{"password", "sslpassword"} {
		if q.Has(k) {
			q.Set(k, "xxxxx")
			u.RawQuery = q.Encode()
		}
	}
	return u.String()
}

// dsnPassword is a password setting of a key=value DSN: quoted (with \' escapes) or up
// to the next space.
var dsnPassword = regexp.MustCompile(`(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)`)

func migrate(ctx context.Context, db *sql.DB, schema string, fsys fs.FS, log *slog.Logger) error {
	store, err := database.NewStore(goose.DialectPostgres, schema+".goose_db_version")
	if err != nil {
		return err
	}
	h := fnv.New64a()
	h.Write([]byte("otpflow-migrate-" + schema))
	// Replicas starting together wait for the one that migrates: poll every second (the
	// default is every 5 s) for up to 5 minutes.
	locker, err := lock.NewPostgresSessionLocker(lock.WithLockID(int64(h.Sum64()>>1)), lock.WithLockTimeout(1, 300))
	if err != nil {
		return err
	}
	p, err := goose.NewProvider("", db, fsys,
		goose.WithStore(store), goose.WithSessionLocker(locker), goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return fmt.Errorf("migrations of %s: %w", schema, err)
	}
	results, err := p.Up(ctx)
	if err != nil {
		return fmt.Errorf("migrate %s: %w", schema, err)
	}
	for _, r := range results {
		log.Info("migrated", "schema", schema, "version", r.Source.Version, "took", r.Duration)
	}
	return nil
}

// RefusedError is a database error that no redelivery will cure: a data exception, an
// integrity or a size limit violation (SQLSTATE classes 22, 23, 54). Its text names the
// SQLSTATE, the constraint and the column, never the message, which may quote the refused
// value.
type RefusedError struct{ PG *pgconn.PgError }

func (e *RefusedError) Error() string {
	s := "database refused the data (SQLSTATE " + e.PG.Code
	if e.PG.ConstraintName != "" {
		s += ", constraint " + e.PG.ConstraintName
	}
	if e.PG.ColumnName != "" {
		s += ", column " + e.PG.ColumnName
	}
	return s + ")"
}

func (e *RefusedError) Unwrap() error { return e.PG }

// RefusedByDatabase tells data the database will never accept from a failure worth
// retrying (a lost connection, a serialization failure, a restart).
func RefusedByDatabase(err error) (*RefusedError, bool) {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || len(pgErr.Code) < 2 {
		return nil, false
	}
	switch pgErr.Code[:2] {
	case "22", "23", "54":
		return &RefusedError{pgErr}, true
	}
	return nil, false
}

// databaseUnavailable tells a failure of the database itself, which no message causes and
// every message meets alike, from one tied to what a statement wrote or read: the server
// unreachable, shutting down or starting up, out of connections, memory or disk, a
// standby taking writes after a failover, the service's role unable to log in or stripped
// of its grants, or a transaction that collided with another (serialization failure,
// deadlock), which succeeds when run again.
func databaseUnavailable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		code := pgErr.Code
		switch {
		case strings.HasPrefix(code, "08"), // connection exception
			strings.HasPrefix(code, "28"),  // invalid authorization: the role cannot log in
			strings.HasPrefix(code, "40"),  // transaction rollback: serialization failure, deadlock
			strings.HasPrefix(code, "53"),  // insufficient resources: too many connections, disk full
			strings.HasPrefix(code, "57P"), // shutdown, crash, cannot connect now, database dropped
			strings.HasPrefix(code, "58"),  // system error: I/O
			code == "25006",                // read-only transaction: a standby
			code == "42501",                // insufficient privilege: grants revoked
			code == "3D000":                // the database does not exist
			return true
		}
		return false
	}
	var connectErr *pgconn.ConnectError
	return errors.As(err, &connectErr) || pgconn.SafeToRetry(err) || pgconn.Timeout(err)
}
