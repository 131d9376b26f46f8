package main

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/services/auditor"
)

const auditUsage = `usage: otpflow audit <command> [flags]

commands:
  verify   check the keyed hash chain against the signed checkpoints and OTP_EVENTS (exit 0 intact, 1 broken)
  replay   read OTP_EVENTS in order: JSON lines to stdout, or rebuild an audit log (--to)
  trail    the timeline of one request or one recipient
  erase    the same as "otpflow erase": one person goes from every service, stream and the log
  purge    delete rows older than an age (a checkpoint keeps the rest verifiable)

purge publishes otp.operator_action (who ran it, what changed) to OTP_EVENTS after acting,
and exits non-zero when that fails, though the action was done. erase publishes
otp.erasure_requested, which names who ran it, and waits for every service's otp.erased.
`

// auditCommand runs "otpflow audit ..." and returns the exit code.
func auditCommand(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) (int, error) {
	if len(args) == 0 {
		fmt.Fprint(stderr, auditUsage)
		return 2, nil
	}
	switch args[0] {
	case "verify":
		return auditVerify(ctx, args[1:], getenv, stdout)
	case "replay":
		return 0, auditReplay(ctx, args[1:], getenv, stdout, stderr)
	case "trail":
		return 0, auditTrail(ctx, args[1:], getenv, stdout)
	case "erase":
		return eraseCommand(ctx, args[1:], getenv, stdout)
	case "purge":
		return auditMaintain(ctx, args[0], args[1:], getenv, stdout)
	}
	fmt.Fprint(stderr, auditUsage)
	return 2, fmt.Errorf("unknown audit command %q", args[0])
}

// openAudit connects to the audit log at url: --db, else OTP_DATABASE_URL, else the
// auditor role's URL that a running "otpflow dev" wrote to dir.
func openAudit(ctx context.Context, url string, getenv func(string) string, dir string) (*pgxpool.Pool, error) {
	return openRoleDB(ctx, url, getenv, filepath.Join(dir, devAuditorDB))
}

// openRoleDB connects as a service's role: url, else OTP_DATABASE_URL, else the URL a
// running "otpflow dev" wrote to devFile.
func openRoleDB(ctx context.Context, url string, getenv func(string) string, devFile string) (*pgxpool.Pool, error) {
	if url == "" {
		url = getenv("OTP_DATABASE_URL")
	}
	if url == "" {
		if b, err := os.ReadFile(devFile); err == nil {
			url = strings.TrimSpace(string(b))
		}
	}
	return platform.OpenPostgres(ctx, url)
}

func auditKey(getenv func(string) string) ([]byte, error) {
	ring, err := keys.Parse(getenv("OTP_AUDIT_KEY"), 32, 0)
	if err != nil {
		return nil, &platform.ConfigError{Var: "OTP_AUDIT_KEY", Msg: err.Error()}
	}
	return ring.Key(ring.ActiveID()), nil
}

// subjectKey reads OTP_SUBJECT_KEY, the ring a person is known by: an address is looked
// up under every key of it.
func subjectKey(getenv func(string) string) (*keys.Subjects, error) {
	s, err := keys.ParseSubjects(getenv("OTP_SUBJECT_KEY"))
	if err != nil {
		return nil, &platform.ConfigError{Var: "OTP_SUBJECT_KEY", Msg: err.Error()}
	}
	return s, nil
}

// chainKey reads OTP_AUDIT_CHAIN_KEY, the key ring of the hash chain.
func chainKey(getenv func(string) string) (*auditor.Chain, error) {
	c, err := auditor.ParseChainKey(getenv("OTP_AUDIT_CHAIN_KEY"))
	if err != nil {
		return nil, &platform.ConfigError{Var: "OTP_AUDIT_CHAIN_KEY", Msg: err.Error()}
	}
	return c, nil
}

// checkpointKeys are the public keys that verify the checkpoints: --public-key, else
// OTP_AUDIT_VERIFY_KEY, else derived from the seeds of OTP_AUDIT_SIGNING_KEY.
func checkpointKeys(flagValue string, getenv func(string) string) (map[string]ed25519.PublicKey, error) {
	for _, v := range []struct{ name, value string }{{"--public-key", flagValue}, {"OTP_AUDIT_VERIFY_KEY", getenv("OTP_AUDIT_VERIFY_KEY")}} {
		if v.value != "" {
			pubs, err := auditor.ParsePublicKeys(v.value)
			if err != nil {
				return nil, &platform.ConfigError{Var: v.name, Msg: err.Error()}
			}
			return pubs, nil
		}
	}
	s, err := auditor.ParseSigningKey(getenv("OTP_AUDIT_SIGNING_KEY"))
	if err != nil {
		return nil, &platform.ConfigError{Var: "OTP_AUDIT_SIGNING_KEY", Msg: "no --public-key or OTP_AUDIT_VERIFY_KEY, and " + err.Error()}
	}
	return s.PublicKeys(), nil
}

func auditVerify(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) (int, error) {
	fs := flag.NewFlagSet("audit verify", flag.ContinueOnError)
	server, dir := serverFlags(fs)
	db := fs.String("db", "", "PostgreSQL URL of the audit log, as the auditor role (default OTP_DATABASE_URL, else the one otpflow dev runs)")
	pub := fs.String("public-key", "", "checkpoint verification keys, id:base64,… (default OTP_AUDIT_VERIFY_KEY, or derived from OTP_AUDIT_SIGNING_KEY)")
	newest := fs.Int("checkpoints", auditor.DefaultCheckedCheckpoints, "how many of the newest signed checkpoints to check")
	if err := fs.Parse(args); err != nil {
		return 2, err
	}
	getenv = withDevKeys(getenv, *dir)
	chain, err := chainKey(getenv)
	if err != nil {
		return 2, err
	}
	pubs, err := checkpointKeys(*pub, getenv)
	if err != nil {
		return 2, err
	}
	pool, err := openAudit(ctx, *db, getenv, *dir)
	if err != nil {
		return 2, err
	}
	defer pool.Close()
	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return 2, err
	}
	defer nc.Close()
	rep, err := chain.VerifyAnchored(ctx, pool, auditor.Anchors{JS: js, PublicKeys: pubs, Checkpoints: *newest})
	if err != nil {
		return 2, err
	}
	if !rep.OK() {
		if rep.BrokenPos == 0 {
			fmt.Fprintf(stdout, "audit log BROKEN at stream sequence %d: %s\n", rep.BrokenSeq, rep.Problem)
		} else {
			fmt.Fprintf(stdout, "audit log BROKEN at chain position %d (stream sequence %d): %s\n", rep.BrokenPos, rep.BrokenSeq, rep.Problem)
		}
		return 1, nil
	}
	fmt.Fprintf(stdout, "audit log intact: %d rows, chain positions %d-%d, %d erased; %d signed checkpoints (newest at %d), %d events of %s matched\n",
		rep.Rows, rep.FirstPos, rep.LastPos, rep.Erased, rep.Checkpoints, rep.NewestCheckpoint, rep.Events, events.StreamEvents)
	return 0, nil
}

func auditTrail(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("audit trail", flag.ContinueOnError)
	dir := devDirFlag(fs)
	var (
		db        = fs.String("db", "", "PostgreSQL URL of the audit log, as the auditor role (default OTP_DATABASE_URL, else the one otpflow dev runs)")
		tenant    = fs.String("tenant", "", "tenant (required)")
		requestID = fs.String("request-id", "", "the request's id")
		recipient = fs.String("recipient", "", "every request of this address")
		asJSON    = fs.Bool("json", false, "print JSON")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	getenv = withDevKeys(getenv, *dir)
	if *tenant == "" || (*requestID == "") == (*recipient == "") {
		return errors.New("audit trail: --tenant and one of --request-id or --recipient are required")
	}
	var subjects *keys.Subjects
	var err error
	if *recipient != "" {
		if subjects, err = subjectKey(getenv); err != nil {
			return err
		}
	}
	pool, err := openAudit(ctx, *db, getenv, *dir)
	if err != nil {
		return err
	}
	defer pool.Close()
	steps, err := auditor.Trail(ctx, pool, subjects, *tenant, *requestID, *recipient)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if steps == nil {
			steps = []auditor.Step{}
		}
		return enc.Encode(steps)
	}
	if len(steps) == 0 {
		fmt.Fprintln(stdout, "no events")
		return nil
	}
	for _, s := range steps {
		fmt.Fprintf(stdout, "%s  %-20s %-12s %s\n", s.Time.UTC().Format("2006-01-02 15:04:05.000"), s.Type, s.RequestID, s.Summary)
	}
	return nil
}

// auditMaintain runs purge, which changes the log: it connects to NATS first (no
// connection, nothing done), acts, then publishes otp.operator_action with the outcome.
func auditMaintain(ctx context.Context, cmd string, args []string, getenv func(string) string, stdout io.Writer) (int, error) {
	fs := flag.NewFlagSet("audit "+cmd, flag.ContinueOnError)
	server, dir := serverFlags(fs)
	db := fs.String("db", "", "PostgreSQL URL of the audit log, as the auditor role (default OTP_DATABASE_URL, else the one otpflow dev runs)")
	olderThan := fs.Duration("older-than", 400*24*time.Hour, "rows older than this")
	if err := fs.Parse(args); err != nil {
		return 2, err
	}
	getenv = withDevKeys(getenv, *dir)
	// The keys first: a command that cannot act must not connect and half-start.
	chain, err := chainKey(getenv)
	if err != nil {
		return 2, err
	}
	pool, err := openAudit(ctx, *db, getenv, *dir)
	if err != nil {
		return 1, err
	}
	defer pool.Close()
	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return 1, fmt.Errorf("audit %s: nothing done: %w", cmd, err)
	}
	defer nc.Close()

	n, err := chain.Purge(ctx, pool, time.Now().Add(-*olderThan))
	if err != nil {
		return 1, err
	}
	outcome := fmt.Sprintf("purged %d rows", n)
	fmt.Fprintln(stdout, outcome)
	if err := publishOperatorAction(ctx, js, "audit."+cmd, systemTenant, fmt.Sprintf("%d rows older than %v", n, *olderThan)); err != nil {
		return 1, notAudited("audit "+cmd, outcome, err)
	}
	return 0, nil
}
