package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// devCommand runs the whole pipeline on one machine: an embedded NATS server with
// JetStream, PostgreSQL (configured, the libpq defaults, or a private cluster), all four
// services and the sandbox mailbox, with dev keys kept under the state directory.
func devCommand(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("dev", flag.ContinueOnError)
	dir := fs.String("dir", ".otpflow", "state directory: NATS store, keys, mailbox, private PostgreSQL")
	natsPort := fs.Int("nats-port", 4222, "NATS client port; a free one is picked if it is taken")
	if err := fs.Parse(args); err != nil {
		return err
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return err
	}

	ns, err := startNATS(filepath.Join(abs, "nats"), *natsPort)
	if err != nil {
		return err
	}
	defer func() { ns.Shutdown(); ns.WaitForShutdown() }()
	url := ns.ClientURL()
	if err := os.WriteFile(filepath.Join(abs, "nats.url"), []byte(url+"\n"), 0o644); err != nil {
		return err
	}
	defer os.Remove(filepath.Join(abs, "nats.url"))

	env, fresh, err := devKeys(filepath.Join(abs, "keys.env"))
	if err != nil {
		return err
	}
	dbURL, stopPG, err := devDatabase(ctx, abs, getenv, stderr, fresh)
	if err != nil {
		return err
	}
	defer stopPG()
	// Migrate as the administrator, then run each service as its own role on the same
	// database; the audit commands find the auditor's URL in dir (auditor.db).
	prefix, err := platform.RolePrefix(getenv)
	if err != nil {
		return err
	}
	migrateURL := dbURL
	if u := getenv("OTP_MIGRATE_DATABASE_URL"); u != "" {
		migrateURL = u
	}
	if err := migrateAll(ctx, migrateURL, prefix, stderr); err != nil {
		return err
	}
	if err := setRoleURLs(env, dbURL, prefix); err != nil {
		return err
	}
	auditorDB := filepath.Join(abs, devAuditorDB)
	if err := os.WriteFile(auditorDB, []byte(env[platform.DatabaseURLVar("auditor")]+"\n"), 0o600); err != nil {
		return err
	}
	defer os.Remove(auditorDB)
	issuerDB := filepath.Join(abs, devIssuerDB)
	if err := os.WriteFile(issuerDB, []byte(env[platform.DatabaseURLVar("issuer")]+"\n"), 0o600); err != nil {
		return err
	}
	defer os.Remove(issuerDB)
	mail := filepath.Join(abs, "mail")
	env["OTP_NATS_URL"] = url
	env["OTP_DATABASE_URL"] = dbURL
	env["OTP_PROVIDERS"] = "sandbox"
	env["OTP_SANDBOX_MAILDIR"] = mail
	env["OTP_MAIL_FROM"] = "otpflow dev <no-reply@otpflow.test>"
	env["OTP_HTTP_ADDR"] = "127.0.0.1:8089"
	env["OTP_ENV"] = "development" // the sandbox mailbox and a laptop's database are the point
	merged := func(k string) string {
		if v := getenv(k); v != "" && k != "OTP_NATS_URL" && k != "OTP_ENV" {
			return v
		}
		return env[k]
	}
	// Provision as the admin the dev server has no other of: the streams and consumers the
	// services bind to.
	common, err := platform.LoadCommon(merged)
	if err != nil {
		return err
	}
	nc, js, err := connectJetStream(url, merged)
	if err != nil {
		return err
	}
	err = provisionStreams(ctx, js, common.Streams(), stderr)
	nc.Close()
	if err != nil {
		return err
	}
	if e := getenv("OTP_ENV"); e != "" && e != "development" {
		fmt.Fprintf(stderr, "note: otpflow dev always runs with OTP_ENV=development; OTP_ENV=%s is ignored\n", e)
	}
	if p := getenv("OTP_PROVIDERS"); p != "" && p != "sandbox" {
		fmt.Fprintf(stderr, "note: OTP_PROVIDERS=%s overrides the sandbox mailbox\n", p)
	}
	fmt.Fprintf(stdout, `otpflow dev is running
  NATS        %s
  PostgreSQL  %s, each service as its own role (%s<service>)
  mail lands  %s/new
  metrics     http://%s/metrics

try it:
  bin/otpflow request -tenant demo -request-id r1 -recipient ana@example.com
  cat %s/new/*            # read the code
  bin/otpflow verify -tenant demo -request-id r1 -code <code>
`, url, redact(dbURL), prefix, merged("OTP_SANDBOX_MAILDIR"), merged("OTP_HTTP_ADDR"), merged("OTP_SANDBOX_MAILDIR"))
	return runPipeline(ctx, merged, stderr)
}

// setRoleURLs sets each service's database URL in env: dbURL as the service's own role.
func setRoleURLs(env map[string]string, dbURL, prefix string) error {
	for _, s := range specs() {
		u, err := platform.RoleURL(dbURL, platform.ServiceRole(prefix, s.Name))
		if err != nil {
			return err
		}
		env[platform.DatabaseURLVar(s.Name)] = u
	}
	return nil
}

func startNATS(storeDir string, port int) (*server.Server, error) {
	if ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); err != nil {
		port = -1 // taken: pick a free one
	} else {
		ln.Close()
	}
	s, err := server.NewServer(&server.Options{
		ServerName: "otpflow-dev", Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: storeDir, NoSigs: true, NoLog: true,
	})
	if err != nil {
		return nil, fmt.Errorf("nats: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		return nil, errors.New("nats: not ready after 10s")
	}
	return s, nil
}

// devDB is the database dev uses on a server it did not start.
const devDB = "otpflow_dev"

// devAuditorDB is the file in the state directory that holds the auditor role's database
// URL while dev runs: the audit commands' default.
const devAuditorDB = "auditor.db"

// devDatabase returns a PostgreSQL URL: OTP_DATABASE_URL, else the database otpflow_dev
// on the server at the libpq defaults if one answers there (created when missing, and
// made anew when the dev keys are new: codes under other keys cannot be verified), else
// a private cluster under dir/pg when PostgreSQL's server binaries are installed.
func devDatabase(ctx context.Context, dir string, getenv func(string) string, stderr io.Writer, freshKeys bool) (string, func(), error) {
	if u := getenv("OTP_DATABASE_URL"); u != "" {
		return u, func() {}, nil
	}
	if answers(ctx, "") {
		url, err := ensureDevDB(ctx, freshKeys)
		return url, func() {}, err
	}
	bin := postgresBinDir()
	if bin == "" {
		return "", nil, errors.New("no PostgreSQL answers at the libpq defaults and no server binaries (initdb) are installed; set OTP_DATABASE_URL")
	}
	fmt.Fprintf(stderr, "no PostgreSQL answers; starting a private cluster under %s/pg\n", dir)
	return privateCluster(bin, filepath.Join(dir, "pg"))
}

// ensureDevDB creates otpflow_dev on the libpq-default server (anew if reset) and
// returns a connection string for it.
func ensureDevDB(ctx context.Context, reset bool) (string, error) {
	return ensureDB(ctx, devDB, reset)
}

// ensureDB creates the database name on the libpq-default server (anew if reset) and
// returns a connection string for it.
func ensureDB(ctx context.Context, name string, reset bool) (string, error) {
	c, err := pgx.Connect(ctx, "")
	if err != nil {
		return "", err
	}
	defer c.Close(ctx)
	if reset {
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			return "", fmt.Errorf("reset %s: %w", name, err)
		}
	}
	var exists bool
	if err := c.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		return "", err
	}
	if !exists {
		if _, err := c.Exec(ctx, "CREATE DATABASE "+name); err != nil {
			return "", fmt.Errorf("create %s: %w", name, err)
		}
	}
	return "dbname=" + name, nil
}

func answers(ctx context.Context, url string) bool {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		return false
	}
	c.Close(ctx)
	return true
}

func postgresBinDir() string {
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p)
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(matches) == 0 {
		return ""
	}
	return filepath.Dir(matches[len(matches)-1])
}

// privateCluster initialises (once) and starts a cluster in dataDir on a free loopback
// port. PostgreSQL refuses to run as root, so as root it runs as the user nobody.
func privateCluster(bin, dataDir string) (string, func(), error) {
	owner := ""
	if os.Geteuid() == 0 {
		owner = "nobody"
	}
	runAs := func(name string, args ...string) *exec.Cmd {
		if owner == "" {
			return exec.Command(filepath.Join(bin, name), args...)
		}
		return exec.Command("runuser", append([]string{"-u", owner, "--", filepath.Join(bin, name)}, args...)...)
	}
	sock := dataDir + "-run"
	for _, d := range []string{dataDir, sock} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return "", nil, err
		}
		if owner != "" {
			u, err := user.Lookup(owner)
			if err != nil {
				return "", nil, err
			}
			uid, _ := strconv.Atoi(u.Uid)
			gid, _ := strconv.Atoi(u.Gid)
			if err := os.Chown(d, uid, gid); err != nil {
				return "", nil, err
			}
		}
	}
	if _, err := os.Stat(filepath.Join(dataDir, "PG_VERSION")); err != nil {
		if out, err := runAs("initdb", "-D", dataDir, "-U", "postgres", "--auth=trust", "-E", "UTF8").CombinedOutput(); err != nil {
			return "", nil, fmt.Errorf("initdb: %v: %s", err, out)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1", port, sock)
	if out, err := runAs("pg_ctl", "-D", dataDir, "-o", opts, "-l", filepath.Join(sock, "postgres.log"), "-w", "start").CombinedOutput(); err != nil {
		return "", nil, fmt.Errorf("pg_ctl start: %v: %s", err, out)
	}
	stop := func() { _ = runAs("pg_ctl", "-D", dataDir, "-m", "fast", "-w", "stop").Run() }
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port), stop, nil
}

// devKeys loads the dev keys from path, creating them on first run (fresh), so codes
// issued before a restart still verify.
func devKeys(path string) (map[string]string, bool, error) {
	env := map[string]string{}
	if f, err := os.Open(path); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), "="); ok {
				env[k] = v
			}
		}
		f.Close()
	}
	fresh := false
	if env["OTP_CODE_PEPPER"] == "" || env["OTP_SEAL_KEY"] == "" || env["OTP_AUDIT_KEY"] == "" {
		fresh = true
		env["OTP_CODE_PEPPER"] = keys.Generate("dev1", 32)
		env["OTP_SEAL_KEY"] = keys.Generate("dev1", 32)
		env["OTP_AUDIT_KEY"] = keys.Generate("dev1", 32)
		content := fmt.Sprintf("OTP_CODE_PEPPER=%s\nOTP_SEAL_KEY=%s\nOTP_AUDIT_KEY=%s\n", env["OTP_CODE_PEPPER"], env["OTP_SEAL_KEY"], env["OTP_AUDIT_KEY"])
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			return nil, false, err
		}
	}
	// Keys added after a keys.env was first written are appended to it, the others kept.
	for _, k := range []struct{ name, id string }{{"OTP_AUDIT_CHAIN_KEY", "devc1"}, {"OTP_AUDIT_SIGNING_KEY", "devs1"}, {"OTP_SUBJECT_KEY", "devk1"}, {"OTP_DLQ_KEY", "devd1"}} {
		if env[k.name] != "" {
			continue
		}
		env[k.name] = keys.Generate(k.id, 32)
		f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0o600)
		if err != nil {
			return nil, false, err
		}
		_, err = fmt.Fprintf(f, "%s=%s\n", k.name, env[k.name])
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, false, err
		}
	}
	return env, fresh, nil
}

// redact describes the database URL u without its password.
func redact(u string) string {
	if u == "dbname="+devDB {
		return devDB + " at the libpq defaults"
	}
	return platform.RedactDatabaseURL(u)
}
