package testenv

import (
	"context"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Tests that prove no personal data rests in a service's tables dump them whole.

// DumpSchema returns every row of every table of schema as JSON, one line a row.
func DumpSchema(t testing.TB, pool *pgxpool.Pool, schema string) (string, map[string]int) {
	t.Helper()
	ctx := context.Background()
	rows, err := pool.Query(ctx, `SELECT table_name FROM information_schema.tables WHERE table_schema = $1 AND table_type = 'BASE TABLE'`, schema)
	Must(t, err, "tables")
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	Must(t, err, "tables")
	var dump strings.Builder
	counts := map[string]int{}
	for _, table := range tables {
		rows, err := pool.Query(ctx, fmt.Sprintf(`SELECT row_to_json(t)::text FROM %s t`, pgx.Identifier{schema, table}.Sanitize()))
		Must(t, err, "dump %s", table)
		lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
		Must(t, err, "dump %s", table)
		counts[table] = len(lines)
		for _, l := range lines {
			dump.WriteString(table + ": " + l + "\n")
		}
	}
	return dump.String(), counts
}

// AssertNoPlaintext fails if dump shows any of needles in any case, as text or as the
// hex that JSON shows bytea in.
func AssertNoPlaintext(t testing.TB, dump string, needles ...string) {
	t.Helper()
	low := strings.ToLower(dump)
	for _, n := range needles {
		for _, form := range []string{strings.ToLower(n), hex.EncodeToString([]byte(n)), hex.EncodeToString([]byte(strings.ToLower(n)))} {
			if i := strings.Index(low, form); i >= 0 {
				line := low[strings.LastIndex(low[:i], "\n")+1:]
				line, _, _ = strings.Cut(line, "\n")
				t.Errorf("%q at rest: %s", n, line)
			}
		}
	}
}
