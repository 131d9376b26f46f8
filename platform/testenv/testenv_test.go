package testenv_test

import (
	"context"
	"net"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNATSRestartKeepsTheContractsStreams: JetStream provisions every stream of the
// contract, and a server started again on the same store and port has them all.
func TestNATSRestartKeepsTheContractsStreams(t *testing.T) {
	dir := t.TempDir()
	s := testenv.NATSAt(t, dir, -1)
	testenv.JetStream(t, s)
	port := s.Addr().(*net.TCPAddr).Port
	s.Shutdown()
	s.WaitForShutdown()

	s = testenv.NATSAt(t, dir, port)
	nc, err := nats.Connect(s.ClientURL())
	testenv.Must(t, err, "connect")
	defer nc.Close()
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	for _, cfg := range events.StreamConfigs(events.StreamOptions{}) {
		if _, err := js.Stream(t.Context(), cfg.Name); err != nil {
			t.Errorf("stream %s after a restart: %v", cfg.Name, err)
		}
	}
}

// TestDatabaseIsFreshAndDroppedAtCleanup: each call gives an empty database of its own,
// gone once the test that asked for it ends.
func TestDatabaseIsFreshAndDroppedAtCleanup(t *testing.T) {
	var name string
	t.Run("use", func(t *testing.T) {
		ctx := context.Background()
		c, err := pgx.Connect(ctx, testenv.Database(t))
		testenv.Must(t, err, "connect")
		defer c.Close(ctx)
		var tables int
		testenv.Must(t, c.QueryRow(ctx, `SELECT current_database(), count(*) FROM pg_tables WHERE schemaname = 'public'`).Scan(&name, &tables), "query")
		if tables != 0 {
			t.Errorf("a fresh database has %d tables", tables)
		}
	})
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, testenv.AdminDatabaseURL())
	testenv.Must(t, err, "connect as admin")
	defer admin.Close(ctx)
	var exists bool
	testenv.Must(t, admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, name).Scan(&exists), "query")
	if name == "" || exists {
		t.Errorf("database %q still exists after its test", name)
	}
}

// TestPrivatePostgresRestarts: a private cluster keeps its port and its data across a
// fast shutdown and a start, and a committed row survives.
func TestPrivatePostgresRestarts(t *testing.T) {
	pg := testenv.PrivatePostgres(t)
	url := pg.CreateDatabase(t, "keep")
	ctx := context.Background()
	c, err := pgx.Connect(ctx, url)
	testenv.Must(t, err, "connect")
	_, err = c.Exec(ctx, `CREATE TABLE t (v int); INSERT INTO t VALUES (7)`)
	testenv.Must(t, err, "write")
	testenv.Must(t, pg.Stop("fast"), "stop")
	if err := c.Ping(ctx); err == nil {
		t.Fatal("a session survived a fast shutdown")
	}
	c.Close(ctx)
	testenv.Must(t, pg.Start(), "start again")
	c, err = pgx.Connect(ctx, url)
	testenv.Must(t, err, "connect after the restart")
	defer c.Close(ctx)
	var v int
	testenv.Must(t, c.QueryRow(ctx, `SELECT v FROM t`).Scan(&v), "read")
	if v != 7 {
		t.Fatalf("read %d after the restart, want 7", v)
	}
}
