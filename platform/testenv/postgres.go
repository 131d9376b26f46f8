package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// PGCluster is a PostgreSQL cluster of a test's own, on a loopback port that stays the
// same across Stop and Start. Tests that stop or restart PostgreSQL need one: the
// machine's server is shared by every test package running at the same time.
type PGCluster struct {
	Port int
	// Log is the server's log file.
	Log string

	data string
	run  func(name string, args ...string) *exec.Cmd
}

// PostgresBinDir is where PostgreSQL's server programs (initdb, pg_ctl) are: the
// directory of initdb on PATH, else the newest /usr/lib/postgresql/*/bin; "" when they
// are not installed.
func PostgresBinDir() string {
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p)
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(matches) == 0 {
		return ""
	}
	return filepath.Dir(matches[len(matches)-1])
}

// PrivatePostgres initialises a cluster in a temporary directory (initdb, trust
// authentication over loopback, fsync off: a restart still loses nothing committed, an OS
// crash could), starts it with pg_ctl on a free loopback
// port, and stops and removes it at cleanup. PostgreSQL refuses to run as root: then the
// cluster runs as the postgres OS user (runuser). The test is skipped when the server
// programs are not installed.
func PrivatePostgres(tb testing.TB) *PGCluster {
	tb.Helper()
	bin := PostgresBinDir()
	if bin == "" {
		tb.Skip("PostgreSQL server programs (initdb, pg_ctl) are not installed")
	}
	c := &PGCluster{run: func(name string, args ...string) *exec.Cmd { return exec.Command(filepath.Join(bin, name), args...) }}
	dir, err := os.MkdirTemp("", "otpflow-pg-")
	Must(tb, err, "cluster directory")
	tb.Cleanup(func() { _ = os.RemoveAll(dir) })
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			tb.Skip("running as root and there is no postgres OS user to run the cluster as")
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		Must(tb, os.Chown(dir, uid, gid), "chown the cluster directory")
		c.run = func(name string, args ...string) *exec.Cmd {
			return exec.Command("runuser", append([]string{"-u", "postgres", "--", filepath.Join(bin, name)}, args...)...)
		}
	}
	c.data, c.Log = filepath.Join(dir, "data"), filepath.Join(dir, "postgres.log")
	if out, err := c.run("initdb", "-D", c.data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8").CombinedOutput(); err != nil {
		tb.Fatalf("initdb: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	Must(tb, err, "free port")
	c.Port = ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	// The socket directory is the cluster's own: the machine's server owns the default one.
	conf := fmt.Sprintf("\nlisten_addresses = '127.0.0.1'\nport = %d\nunix_socket_directories = '%s'\n"+
		"fsync = off\nmax_connections = 200\nshared_buffers = 64MB\n", c.Port, dir)
	f, err := os.OpenFile(filepath.Join(c.data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	Must(tb, err, "postgresql.conf")
	_, err = f.WriteString(conf)
	Must(tb, err, "postgresql.conf")
	Must(tb, f.Close(), "postgresql.conf")
	Must(tb, c.Start(), "start the private cluster")
	tb.Cleanup(func() { _ = c.Stop("immediate") })
	return c
}

// URL is the cluster's postgres database as the superuser postgres.
func (c *PGCluster) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.Port)
}

// Start starts the stopped cluster and returns once it accepts connections.
func (c *PGCluster) Start() error {
	if out, err := c.run("pg_ctl", "-D", c.data, "-l", c.Log, "-w", "-t", "60", "start").CombinedOutput(); err != nil {
		log, _ := os.ReadFile(c.Log)
		return fmt.Errorf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	return nil
}

// Stop stops the cluster with pg_ctl's shutdown mode ("smart", "fast" or "immediate")
// and returns once it is down. "fast" is what a service manager's stop and most
// failovers do: open sessions are cut, open transactions roll back.
func (c *PGCluster) Stop(mode string) error {
	if out, err := c.run("pg_ctl", "-D", c.data, "-m", mode, "-w", "-t", "60", "stop").CombinedOutput(); err != nil {
		return fmt.Errorf("pg_ctl stop -m %s: %v\n%s", mode, err, out)
	}
	return nil
}

// CreateDatabase creates database name on the cluster and returns its URL as the
// superuser.
func (c *PGCluster) CreateDatabase(tb testing.TB, name string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL())
	Must(tb, err, "connect to the private cluster")
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
	Must(tb, err, "create database %s", name)
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.Port, name)
}
