package platform_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNATSTLSHandshake connects a service to the server of deploy/nats over TLS: with
// the CA that signed the server's certificate it works, with another CA it fails with
// one line that names the CA file and the variable.
func TestNATSTLSHandshake(t *testing.T) {
	d := testenv.DeployedNATS(t)
	c := d.Common("issuer")
	nc, err := platform.ConnectNATS(c, "issuer", testenv.Logger(io.Discard))
	testenv.Must(t, err, "connect with the right CA")
	host, state := platform.NATSPeer(nc)
	nc.Close()
	if state == nil {
		t.Fatal("connected without TLS")
	}
	testenv.Must(t, platform.CheckNATSTLS(host, state, false), "production check of the TLS connection")

	c.NATSTLSCA = testenv.NewCA(t, "some other CA").File
	_, err = platform.ConnectNATS(c, "issuer", testenv.Logger(io.Discard))
	wrongCA(t, err, "x509: certificate signed by unknown authority",
		"the server's certificate is not signed by the CA in "+c.NATSTLSCA+" (OTP_NATS_TLS_CA)")
}

// TestPostgresTLSHandshake starts a private PostgreSQL cluster with ssl=on and a server
// certificate from a test CA, and connects with sslmode=verify-full: with that CA it
// works (and the session is TLS), with another it fails with one line naming the CA.
func TestPostgresTLSHandshake(t *testing.T) {
	ca := testenv.NewCA(t, "otpflow test CA")
	port := privatePostgres(t, ca)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	url := fmt.Sprintf("postgres://postgres@localhost:%d/postgres?sslmode=verify-full&sslrootcert=%s", port, ca.File)
	pool, err := platform.OpenPostgres(ctx, url)
	testenv.Must(t, err, "connect with the right CA")
	defer pool.Close()
	var ssl bool
	testenv.Must(t, pool.QueryRow(ctx, `SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()`).Scan(&ssl), "pg_stat_ssl")
	if !ssl {
		t.Fatal("the session is not TLS")
	}
	testenv.Must(t, platform.CheckPostgresTLS(url), "production check of the URL")

	other := testenv.NewCA(t, "some other CA")
	_, err = platform.OpenPostgres(ctx, fmt.Sprintf("postgres://postgres@localhost:%d/postgres?sslmode=verify-full&sslrootcert=%s", port, other.File))
	wrongCA(t, err, "x509: certificate signed by unknown authority",
		"the server's certificate is not signed by the CA that sslrootcert names")
}

// wrongCA expects err to be one line saying the server's certificate was not trusted.
func wrongCA(t *testing.T, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Fatal("connected with a CA that did not sign the server's certificate")
	}
	msg := err.Error()
	if strings.Contains(msg, "\n") {
		t.Fatalf("not one line: %q", msg)
	}
	for _, w := range want {
		if !strings.Contains(msg, w) {
			t.Fatalf("the error does not say %q:\n%s", w, msg)
		}
	}
	t.Logf("wrong CA: %s", msg)
}

// pgBin is where Debian's PostgreSQL 15 server programs are.
const pgBin = "/usr/lib/postgresql/15/bin"

// privatePostgres starts a PostgreSQL cluster of its own, in a temporary directory, on a
// free loopback port, with ssl=on and a server certificate for localhost from ca, and
// stops and removes it at cleanup. PostgreSQL refuses to run as root: then the cluster
// runs as the postgres OS user (runuser). Skipped when initdb is not installed.
func privatePostgres(t *testing.T, ca *testenv.CA) int {
	t.Helper()
	if _, err := os.Stat(filepath.Join(pgBin, "initdb")); err != nil {
		t.Skipf("PostgreSQL server programs are not installed (%s/initdb): %v", pgBin, err)
	}
	run := func(name string, args ...string) *exec.Cmd { return exec.Command(filepath.Join(pgBin, name), args...) }
	dir, err := os.MkdirTemp("", "otpflow-pg-")
	testenv.Must(t, err, "cluster directory")
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	uid, gid := -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Skip("running as root and there is no postgres OS user to run the cluster as")
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		run = func(name string, args ...string) *exec.Cmd {
			return exec.Command("runuser", append([]string{"-u", "postgres", "--", filepath.Join(pgBin, name)}, args...)...)
		}
		testenv.Must(t, os.Chown(dir, uid, gid), "chown the cluster directory")
	}
	data := filepath.Join(dir, "data")
	if out, err := run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	cert, key := ca.Issue(t, "postgres-server")
	for _, f := range []struct{ from, to string }{{cert, "server.crt"}, {key, "server.key"}} {
		b, err := os.ReadFile(f.from)
		testenv.Must(t, err, "read %s", f.from)
		to := filepath.Join(data, f.to)
		testenv.Must(t, os.WriteFile(to, b, 0o600), "write %s", to)
		if uid >= 0 {
			testenv.Must(t, os.Chown(to, uid, gid), "chown %s", to)
		}
	}
	port := freePort(t)
	conf := fmt.Sprintf("\nlisten_addresses = '127.0.0.1'\nport = %d\nunix_socket_directories = '%s'\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nfsync = off\nshared_buffers = 16MB\nmax_connections = 20\n", port, dir)
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	testenv.Must(t, err, "postgresql.conf")
	_, err = f.WriteString(conf)
	testenv.Must(t, err, "postgresql.conf")
	testenv.Must(t, f.Close(), "postgresql.conf")
	// Only TLS over TCP: a plaintext connection is refused by pg_hba.
	testenv.Must(t, os.WriteFile(filepath.Join(data, "pg_hba.conf"), []byte("local all all trust\nhostssl all all 127.0.0.1/32 trust\n"), 0o600), "pg_hba.conf")
	if uid >= 0 {
		testenv.Must(t, os.Chown(filepath.Join(data, "pg_hba.conf"), uid, gid), "chown pg_hba.conf")
	}
	logFile := filepath.Join(dir, "postgres.log")
	if out, err := run("pg_ctl", "-D", data, "-l", logFile, "-w", "-t", "60", "start").CombinedOutput(); err != nil {
		log, _ := os.ReadFile(logFile)
		t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	t.Cleanup(func() {
		if out, err := run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop").CombinedOutput(); err != nil {
			t.Errorf("pg_ctl stop: %v\n%s", err, out)
		}
	})
	return port
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "free port")
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
