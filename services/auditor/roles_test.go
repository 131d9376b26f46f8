package auditor

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// The attacks below are made by whoever holds the auditor's database credentials. Its role
// may read the log and append to it; every other change goes through the SECURITY DEFINER
// functions of migrations/00004_roles.sql, which run as the log's owner and check what
// they are asked. Each attack must fail with the defence named, and the log still verify.

// refused runs sql on pool and checks that it fails with SQLSTATE code and a message
// containing msg.
func refused(t *testing.T, pool *pgxpool.Pool, sql, code, msg string) {
	t.Helper()
	_, err := pool.Exec(context.Background(), sql)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != code || !strings.Contains(pgErr.Message, msg) {
		t.Errorf("%s\n  got %v, want SQLSTATE %s %q", sql, err, code, msg)
	}
}

// intact checks that the log still holds its n rows, all of them verified.
func intact(t *testing.T, pool *pgxpool.Pool, n int64) {
	t.Helper()
	rep, err := testChain.Verify(context.Background(), pool)
	testenv.Must(t, err, "verify")
	if !rep.OK() || rep.Rows != n || rep.LastPos != n {
		t.Fatalf("after the attacks: %+v, want %d rows intact", rep, n)
	}
}

// TestAuditorRoleCannotRewriteTheLog: the auditor's own role can neither change nor
// remove a row, nor move or forge what the chain is checked against, nor switch off or
// drop the trigger, nor use the old purge setting, nor change or remove the alert state
// it appends to (it prunes only through audit.prune_alerts). Privileges refuse it (42501)
// before any trigger runs.
func TestAuditorRoleCannotRewriteTheLog(t *testing.T) {
	pool := seed(t, 8)
	owner := platform.OwnerRole(strings.TrimSuffix(roleOf(t, pool), "auditor"))
	for _, tc := range []struct{ name, sql, msg string }{
		{"update a row", `UPDATE audit.events SET tenant = 'evil' WHERE chain_pos = 3`, "permission denied for table events"},
		{"erase by hand", `UPDATE audit.events SET recipient_hash = NULL, recipient_masked = '', pii = NULL, pii_salt = NULL`, "permission denied for table events"},
		{"delete a row", `DELETE FROM audit.events WHERE chain_pos = 3`, "permission denied for table events"},
		{"truncate", `TRUNCATE audit.events`, "permission denied for table events"},
		{"purge with the old session setting", `SET otpflow.audit_purge = 'on'; DELETE FROM audit.events WHERE chain_pos <= 4`, "permission denied for table events"},
		{"rewind the head", `UPDATE audit.chain_head SET pos = 6`, "permission denied for table chain_head"},
		{"delete the head", `DELETE FROM audit.chain_head`, "permission denied for table chain_head"},
		{"forge a purge checkpoint", `INSERT INTO audit.checkpoints (pos, hash) SELECT chain_pos, row_hash FROM audit.events WHERE chain_pos = 4`, "permission denied for table checkpoints"},
		{"edit a checkpoint", `UPDATE audit.checkpoints SET pos = 1`, "permission denied for table checkpoints"},
		{"delete checkpoints", `DELETE FROM audit.checkpoints`, "permission denied for table checkpoints"},
		{"forget the alerts raised", `DELETE FROM audit.alerts_raised`, "permission denied for table alerts_raised"},
		{"move an alert's time", `UPDATE audit.alerts_raised SET raised_at = now()`, "permission denied for table alerts_raised"},
		{"rewrite an alert window", `UPDATE audit.alert_stamps SET n = 0`, "permission denied for table alert_stamps"},
		{"empty the alert windows", `TRUNCATE audit.alert_stamps`, "permission denied for table alert_stamps"},
		{"disable the trigger", `ALTER TABLE audit.events DISABLE TRIGGER ALL`, "must be owner of table events"},
		{"drop the trigger", `DROP TRIGGER events_append_only ON audit.events`, "must be owner of relation events"},
		{"replace the trigger function", `CREATE OR REPLACE FUNCTION audit.forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$`, "permission denied for schema audit"},
		{"add a function to the schema", `CREATE FUNCTION audit.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'`, "permission denied for schema audit"},
		{"replication mode (triggers off)", `SET session_replication_role = replica`, "permission denied to set parameter"},
		{"become the owner", `SET ROLE ` + owner, "permission denied to set role"},
	} {
		t.Run(tc.name, func(t *testing.T) { refused(t, pool, tc.sql, "42501", tc.msg) })
	}
	intact(t, pool, 8)
}

// roleOf is the role pool is logged in as.
func roleOf(t *testing.T, pool *pgxpool.Pool) string {
	t.Helper()
	var r string
	testenv.Must(t, pool.QueryRow(context.Background(), `SELECT current_user`).Scan(&r), "current user")
	return r
}

// TestTriggerIgnoresTheSessionSetting: the trigger lets a row change or go only under the
// log's owner, inside the audit functions. A role that holds DELETE (here a superuser, with
// triggers on) and sets the old purge setting is still refused.
func TestTriggerIgnoresTheSessionSetting(t *testing.T) {
	pool := seed(t, 8)
	admin := testenv.Admin(t, pool)
	refused(t, admin, `SET otpflow.audit_purge = 'on'; DELETE FROM audit.events WHERE chain_pos <= 4`, "P0001", "append-only")
	refused(t, admin, `SET otpflow.audit_purge = 'on'; UPDATE audit.events SET recipient_hash = NULL, recipient_masked = '', pii = NULL, pii_salt = NULL`, "P0001", "append-only")
	intact(t, pool, 8)
}

// TestChainHeadOnlyMovesForwardOverItsRows: the head moves only through audit.advance_head,
// which refuses to move it back, to stand still, or to a position or hash no row has.
func TestChainHeadOnlyMovesForwardOverItsRows(t *testing.T) {
	pool := seed(t, 8)
	for _, tc := range []struct{ name, sql, msg string }{
		{"backwards", `SELECT audit.advance_head(6, (SELECT row_hash FROM audit.events WHERE chain_pos = 6))`, "only moves forward"},
		{"in place", `SELECT audit.advance_head(8, (SELECT row_hash FROM audit.events WHERE chain_pos = 8))`, "only moves forward"},
		{"past the last row", `SELECT audit.advance_head(9, '\x00')`, "cannot move to 9"},
	} {
		t.Run(tc.name, func(t *testing.T) { refused(t, pool, tc.sql, "P0001", tc.msg) })
	}
	// A row appended out of the chain (its link forged) cannot be put under the head either.
	tx, err := pool.Begin(context.Background())
	testenv.Must(t, err, "begin")
	defer tx.Rollback(context.Background())
	_, err = tx.Exec(context.Background(), `INSERT INTO audit.events (stream_seq, subject, type, tenant, event_id, source, occurred_at, payload, chain_pos, prev_hash, row_hash, pii_digest)
		VALUES (99, 'otp.verified.acme', 'otp.verified', 'acme', 'x', 'evil', now(), '{}', 9, '\x01', '\x02', '\x03')`)
	testenv.Must(t, err, "the auditor's role may insert")
	_, err = tx.Exec(context.Background(), `SELECT audit.advance_head(9, '\x02')`)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || !strings.Contains(pgErr.Message, "cannot move to 9") {
		t.Fatalf("head moved over a row that does not link to it: %v", err)
	}
	tx.Rollback(context.Background())
	intact(t, pool, 8)
}

// TestAuditFunctionsNeedTheirGrant: the functions are closed to PUBLIC; a role that may
// read the log but was granted no function cannot purge, erase, move the head, chain
// rows or prune the alert windows, and chain_legacy refuses a log already chained,
// whoever calls it.
func TestAuditFunctionsNeedTheirGrant(t *testing.T) {
	ctx := context.Background()
	d := testenv.NewDB(t)
	d.Migrate(t, Spec())
	pool := testenv.Pool(t, d.RoleURL("auditor"))
	seedOn(t, pool, 8)
	reader := d.Prefix + "reader"
	_, err := testenv.Pool(t, d.URL).Exec(ctx, `CREATE ROLE `+reader+` LOGIN; GRANT USAGE ON SCHEMA audit TO `+reader+`;
		GRANT SELECT ON ALL TABLES IN SCHEMA audit TO `+reader)
	testenv.Must(t, err, "a reader role")
	rd := testenv.Pool(t, d.As(reader))
	for _, sql := range []string{
		`SELECT audit.purge(4, (SELECT row_hash FROM audit.events WHERE chain_pos = 4), 'c1', '\x00')`,
		`SELECT audit.erase(ARRAY[(SELECT recipient_hash FROM audit.events WHERE chain_pos = 1)])`,
		`SELECT audit.advance_head(9, '\x00')`,
		`SELECT * FROM audit.lock_head()`,
		`SELECT audit.chain_legacy('{}', '{}', '{}', '{}', '{}', 'c1')`,
		`SELECT audit.prune_alerts(now())`,
	} {
		refused(t, rd, sql, "42501", "permission denied for function")
	}
	refused(t, pool, `SELECT audit.chain_legacy('{1}', '{"\\x00"}', '{"\\x00"}', '{"\\x00"}', '{"\\x00"}', 'c1')`, "P0001", "chained already")
	intact(t, pool, 8)

	// The auditor's role erases nobody a chained erasure request does not name: not by
	// hashes of its choosing, not through a row that is no erasure request.
	refused(t, pool, `SELECT audit.erase(ARRAY[(SELECT recipient_hash FROM audit.events WHERE chain_pos = 1)])`, "42501", "permission denied for function")
	refused(t, pool, `SELECT audit.erase_subject((SELECT stream_seq FROM audit.events WHERE chain_pos = 1))`, "P0001", "no chained erasure request")
	// The owner erases by hash; the auditor's role purges through the function; the chain
	// still verifies.
	n, err := Erase(ctx, testenv.Admin(t, pool), testSubjects, "u1@example.com")
	testenv.Must(t, err, "erase")
	var oldest int64
	testenv.Must(t, pool.QueryRow(ctx, `SELECT max(chain_pos) FROM audit.events`).Scan(&oldest), "rows")
	purged, err := testChain.Purge(ctx, pool, time.Now().Add(time.Hour))
	testenv.Must(t, err, "purge")
	rep, err := testChain.Verify(ctx, pool)
	testenv.Must(t, err, "verify")
	if n != 2 || purged != oldest || !rep.OK() || rep.PurgedTo != oldest {
		t.Fatalf("erased %d, purged %d of %d; %+v", n, purged, oldest, rep)
	}
}

// TestChainHeadRefusesAGap: audit.advance_head moves the head only over a run of rows with
// no position missing. Rows at head+1 (linking to the head) and head+3 (with the hash
// asked for) but none at head+2 do not let it move to head+3.
func TestChainHeadRefusesAGap(t *testing.T) {
	ctx := context.Background()
	pool := seed(t, 8)
	tx, err := pool.Begin(ctx)
	testenv.Must(t, err, "begin")
	defer tx.Rollback(ctx)
	_, err = tx.Exec(ctx, `INSERT INTO audit.events (stream_seq, subject, type, tenant, event_id, source, occurred_at, payload, chain_pos, prev_hash, row_hash, pii_digest)
		VALUES (99, 'otp.verified.acme', 'otp.verified', 'acme', 'x9', 'evil', now(), '{}', 9, (SELECT hash FROM audit.chain_head), '\x09', '\x03'),
		       (101, 'otp.verified.acme', 'otp.verified', 'acme', 'x11', 'evil', now(), '{}', 11, '\x0a', '\x0b', '\x03')`)
	testenv.Must(t, err, "the auditor's role may insert")
	_, err = tx.Exec(ctx, `SELECT audit.advance_head(11, '\x0b')`)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || !strings.Contains(pgErr.Message, "cannot move to 11") {
		t.Fatalf("head moved over a gap at 10: %v", err)
	}
	tx.Rollback(ctx)
	intact(t, pool, 8)
}

// TestForgedPurgeCheckpointOutlivesALaterPurge: the auditor's role may call audit.purge,
// and the database cannot check the MAC it passes. verify checks the MAC of every purge
// checkpoint, so a forged purge stays reported after a genuine purge has come after it.
func TestForgedPurgeCheckpointOutlivesALaterPurge(t *testing.T) {
	ctx := context.Background()
	pool := seed(t, 8)
	_, err := pool.Exec(ctx, `SELECT audit.purge(4, (SELECT row_hash FROM audit.events WHERE chain_pos = 4), 'c1', '\x00')`)
	testenv.Must(t, err, "a purge with a made-up MAC")
	rep, err := testChain.Verify(ctx, pool)
	testenv.Must(t, err, "verify")
	if rep.OK() || rep.BrokenPos != 4 {
		t.Fatalf("after a forged purge: %+v, want the checkpoint at 4 reported", rep)
	}
	purged, err := testChain.Purge(ctx, pool, time.Now().Add(time.Hour))
	testenv.Must(t, err, "a genuine purge")
	rep, err = testChain.Verify(ctx, pool)
	testenv.Must(t, err, "verify")
	if purged != 4 || rep.OK() || rep.BrokenPos != 4 || rep.PurgedTo != 8 || !strings.Contains(rep.Problem, "purge checkpoint at chain position 4") {
		t.Fatalf("purged %d, then %+v: want the forged checkpoint at 4 still reported", purged, rep)
	}
}

// evilTypeSQL makes, in the session's temporary schema, a type named bytea whose check runs
// a function: called where a SECURITY DEFINER function resolves the name bytea in the
// caller's temporary schema, it runs as the log's owner, switches the trigger off and
// grants the caller UPDATE, DELETE and TRUNCATE on the log.
const evilTypeSQL = `CREATE FUNCTION pg_temp.evil(v pg_catalog.bytea) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF current_user <> session_user THEN
        EXECUTE 'ALTER TABLE audit.events DISABLE TRIGGER ALL';
        EXECUTE pg_catalog.format('GRANT UPDATE, DELETE, TRUNCATE ON audit.events, audit.checkpoints, audit.chain_head TO %I', session_user);
    END IF;
    RETURN true;
END $$;
CREATE DOMAIN pg_temp.bytea AS pg_catalog.bytea CHECK (pg_temp.evil(VALUE))`

// TestDefinerFunctionsIgnoreTheCallersTempSchema: the audit functions run as the log's
// owner; a type of the caller's temporary schema must not stand in for one they declare.
// otpflow migrate leaves the service roles no temporary schema at all; and even where a
// role was given one back (TEMPORARY granted by hand), the functions name pg_temp last in
// their search_path and qualify their types, so the hijack runs nothing as the owner.
func TestDefinerFunctionsIgnoreTheCallersTempSchema(t *testing.T) {
	for _, via := range []string{
		"chain_legacy", // on the empty log: returns 0 after reading the head into a bytea
		"advance_head", // by Append
	} {
		t.Run(via, func(t *testing.T) {
			ctx := context.Background()
			d := testenv.NewDB(t)
			d.Migrate(t, Spec())
			role := platform.ServiceRole(d.Prefix, "auditor")
			pool := testenv.Pool(t, d.RoleURL("auditor"))
			refused(t, pool, `CREATE TEMP TABLE mine (id int)`, "42501", "permission denied to create temporary tables")
			refused(t, pool, evilTypeSQL, "42501", "permission denied to create temporary tables")

			admin := testenv.Pool(t, d.URL)
			_, err := admin.Exec(ctx, `DO $$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO `+role+`', current_database()); END $$`)
			testenv.Must(t, err, "give the role a temporary schema back")
			// One connection: the temporary schema and the functions' compiled forms are per session.
			cfg, err := pgxpool.ParseConfig(d.RoleURL("auditor"))
			testenv.Must(t, err, "config")
			cfg.MaxConns = 1
			one, err := pgxpool.NewWithConfig(ctx, cfg)
			testenv.Must(t, err, "pool")
			defer one.Close()
			_, err = one.Exec(ctx, evilTypeSQL)
			testenv.Must(t, err, "the role's own temporary objects")
			n := int64(0)
			if via == "chain_legacy" {
				err := one.QueryRow(ctx, `SELECT audit.chain_legacy('{}', '{}', '{}', '{}', '{}', 'c1')`).Scan(new(int64))
				testenv.Must(t, err, "chain_legacy of nothing")
			} else {
				seedOn(t, one, 4)
				n = 4
			}
			rows, err := admin.Query(ctx, `SELECT t || ' ' || p FROM unnest(ARRAY['audit.events', 'audit.checkpoints', 'audit.chain_head']) t,
				unnest(ARRAY['UPDATE', 'DELETE', 'TRUNCATE']) p WHERE has_table_privilege($1, t, p)
				UNION ALL SELECT 'trigger ' || tgname || ' disabled' FROM pg_trigger WHERE tgrelid = 'audit.events'::regclass AND tgenabled = 'D'
				ORDER BY 1`, role)
			testenv.Must(t, err, "privileges")
			gained, err := pgx.CollectRows(rows, pgx.RowTo[string])
			testenv.Must(t, err, "privileges")
			if len(gained) > 0 {
				t.Errorf("the caller's temporary type ran as the owner: %v", gained)
			}
			refused(t, one, `DELETE FROM audit.events`, "42501", "permission denied for table events")
			if n > 0 {
				intact(t, pool, n)
			}
		})
	}
}

// TestMigrateNormalisesAPreexistingAuditorRole: a role named like the auditor's that exists
// before otpflow migrate (made by hand, with powers) is not reused as it is: migrate takes
// its attributes and its memberships (pg_write_all_data, the owner), so that it may do only
// what its grants say.
func TestMigrateNormalisesAPreexistingAuditorRole(t *testing.T) {
	ctx := context.Background()
	d := testenv.NewDB(t)
	role, owner := platform.ServiceRole(d.Prefix, "auditor"), platform.OwnerRole(d.Prefix)
	admin := testenv.Pool(t, d.URL)
	_, err := admin.Exec(ctx, `CREATE ROLE `+owner+` NOLOGIN;
		CREATE ROLE `+role+` LOGIN SUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS;
		GRANT pg_write_all_data, `+owner+` TO `+role)
	testenv.Must(t, err, "a role made before migrate")
	t.Cleanup(func() { admin.Exec(context.Background(), `DROP DATABASE IF EXISTS `+d.Prefix+`mine`) }) // made only if an attack succeeds
	d.Migrate(t, Spec())
	pool := testenv.Pool(t, d.RoleURL("auditor"))
	seedOn(t, pool, 8)
	_, err = pool.Exec(ctx, `SELECT audit.purge(2, (SELECT row_hash FROM audit.events WHERE chain_pos = 2), 'c1', '\x00')`)
	testenv.Must(t, err, "a checkpoint to delete")
	var attrs, memberships int
	testenv.Must(t, admin.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_roles WHERE rolname = $1 AND
		(rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls OR NOT rolcanlogin)),
		(SELECT count(*) FROM pg_auth_members WHERE member = $1::regrole)`, role).Scan(&attrs, &memberships), "role")
	if attrs != 0 || memberships != 0 {
		t.Errorf("after migrate: %d roles with extra attributes, %d memberships", attrs, memberships)
	}
	for _, tc := range []struct{ sql, msg string }{
		{`DELETE FROM audit.checkpoints`, "permission denied for table checkpoints"},
		{`DELETE FROM audit.events`, "permission denied for table events"},
		{`CREATE ROLE ` + d.Prefix + `mine`, "permission denied to create role"},
		{`CREATE DATABASE ` + d.Prefix + `mine`, "permission denied to create database"},
		{`SET ROLE ` + owner, "permission denied to set role"}, // last: it would stick to a connection
	} {
		refused(t, pool, tc.sql, "42501", tc.msg)
	}
}
