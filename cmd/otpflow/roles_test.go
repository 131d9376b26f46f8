package main

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestServiceRolesStayInTheirSchemas: after otpflow migrate, each service's role reads its
// own tables and no other service's, and can neither alter, drop nor truncate its own
// (the owner role owns them); nor can it write its migration version.
func TestServiceRolesStayInTheirSchemas(t *testing.T) {
	ctx := context.Background()
	d := testenv.NewDB(t)
	d.Migrate(t, specs()...)
	rows, err := testenv.Pool(t, d.URL).Query(ctx, `SELECT schemaname, quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables
		WHERE schemaname IN ('issuer', 'dispatcher', 'verifier', 'audit') AND tablename <> 'goose_db_version' ORDER BY 1, 2`)
	testenv.Must(t, err, "tables")
	type table struct{ Schema, Name string }
	tables, err := pgx.CollectRows(rows, pgx.RowToStructByPos[table])
	testenv.Must(t, err, "tables")
	if len(tables) < 10 {
		t.Fatalf("only %d tables found", len(tables))
	}
	denied := func(t *testing.T, err error, what string) {
		t.Helper()
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
			t.Errorf("%s: got %v, want SQLSTATE 42501", what, err)
		}
	}
	for _, s := range specs() {
		t.Run(s.Name, func(t *testing.T) {
			pool := testenv.Pool(t, d.RoleURL(s.Name))
			for _, tb := range tables {
				_, err := pool.Exec(ctx, "SELECT * FROM "+tb.Name+" LIMIT 1")
				if tb.Schema != s.Schema {
					denied(t, err, "read "+tb.Name)
					continue
				}
				testenv.Must(t, err, "read its own %s", tb.Name)
				for _, sql := range []string{"ALTER TABLE " + tb.Name + " ADD COLUMN x int", "ALTER TABLE " + tb.Name + " DISABLE TRIGGER ALL",
					"DROP TABLE " + tb.Name, "TRUNCATE " + tb.Name} {
					_, err := pool.Exec(ctx, sql)
					denied(t, err, sql)
				}
			}
			_, err := pool.Exec(ctx, "UPDATE "+s.Schema+".goose_db_version SET version_id = version_id + 100")
			denied(t, err, "write its migration version")
		})
	}
}
