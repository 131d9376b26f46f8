package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestPrivateCluster starts the private PostgreSQL cluster "otpflow dev" falls back to
// when nothing answers, twice on the same data directory (the second start reuses it).
func TestPrivateCluster(t *testing.T) {
	bin := postgresBinDir()
	if bin == "" {
		t.Skip("PostgreSQL server binaries (initdb) are not installed")
	}
	// As root the cluster runs as nobody, who must be able to reach the directory.
	dir, err := os.MkdirTemp("", "otpflow-pg-")
	testenv.Must(t, err, "temp dir")
	t.Cleanup(func() { os.RemoveAll(dir) })
	testenv.Must(t, os.Chmod(dir, 0o755), "chmod")

	for round := range 2 {
		url, stop, err := privateCluster(bin, filepath.Join(dir, "pg"))
		testenv.Must(t, err, "start private cluster (round %d)", round)
		conn, err := pgx.Connect(context.Background(), url)
		if err != nil {
			stop()
			t.Fatalf("connect to %s: %v", url, err)
		}
		var one int
		err = conn.QueryRow(context.Background(), "SELECT 1").Scan(&one)
		conn.Close(context.Background())
		stop()
		if err != nil || one != 1 {
			t.Fatalf("query: %v", err)
		}
		if answers(context.Background(), url) {
			t.Fatal("the cluster still answers after stop")
		}
	}
}
