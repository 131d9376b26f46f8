package main

import (
	"context"
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
	"github.com/otpflow/otpflow/services/issuer"
)

const suppressionUsage = `usage: otpflow suppression <list|add|remove> [flags]

  list    a tenant's suppressed recipients (by subject hash), newest first; --recipient
          shows one person's entries
  add     suppress a recipient by hand (reason operator): their requests are refused
          with reason suppressed; --for bounds it (default: until removed)
  remove  take a recipient off the list (a bounce or complaint entry, or an operator's)

A recipient is named by address and found by its subject hashes (OTP_SUBJECT_KEY). The
database is the issuer's: --db, else OTP_DATABASE_URL (as the issuer role), else the one
"otpflow dev" runs. add and remove are recorded as otp.operator_action.
`

// suppressionCommand runs "otpflow suppression".
func suppressionCommand(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) (int, error) {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, suppressionUsage)
		return 0, nil
	}
	cmd := args[0]
	if cmd != "list" && cmd != "add" && cmd != "remove" {
		fmt.Fprint(stderr, suppressionUsage)
		return 2, fmt.Errorf("unknown suppression command %q", cmd)
	}
	fs := flag.NewFlagSet("suppression "+cmd, flag.ContinueOnError)
	server, dir := serverFlags(fs)
	var (
		db        = fs.String("db", "", "PostgreSQL URL of the issuer's database, as the issuer role (default OTP_DATABASE_URL, else the one otpflow dev runs)")
		tenant    = fs.String("tenant", "", "the tenant (required)")
		recipient = fs.String("recipient", "", "the recipient's address (required for add and remove)")
		forTime   = fs.Duration("for", 0, "add: how long the entry lasts (0: until removed)")
		limit     = fs.Int("limit", 100, "list: at most this many entries (0: all)")
		asJSON    = fs.Bool("json", false, "list: one JSON object per line")
	)
	if err := fs.Parse(args[1:]); err != nil {
		return 2, err
	}
	getenv = withDevKeys(getenv, *dir)
	if !events.ValidTenant(*tenant) {
		return 2, fmt.Errorf("suppression %s: --tenant must be a tenant id", cmd)
	}
	if cmd != "list" && *recipient == "" {
		return 2, fmt.Errorf("suppression %s: --recipient is required", cmd)
	}
	if *forTime < 0 {
		return 2, fmt.Errorf("suppression %s: --for must not be negative", cmd)
	}
	var hashes []string
	var subjects *keys.Subjects
	if *recipient != "" {
		s, err := keys.ParseSubjects(getenv("OTP_SUBJECT_KEY"))
		if err != nil {
			return 2, &platform.ConfigError{Var: "OTP_SUBJECT_KEY", Msg: err.Error()}
		}
		if _, err := events.DecodeRequested([]byte(fmt.Sprintf(`{"request_id":"x","purpose":"x","recipient":%q}`, *recipient))); err != nil {
			return 2, fmt.Errorf("suppression %s: --recipient is not an address otpflow would mail: %w", cmd, err)
		}
		subjects, hashes = s, s.SubjectHashes(*tenant, *recipient)
	}
	pool, err := openIssuerDB(ctx, *db, getenv, *dir)
	if err != nil {
		return 1, err
	}
	defer pool.Close()

	if cmd == "list" {
		list, err := issuer.ListSuppressions(ctx, pool, *tenant, hashes, *limit)
		if err != nil {
			return 1, fmt.Errorf("suppression list: %w", err)
		}
		for _, s := range list {
			if *asJSON {
				b, _ := json.Marshal(s)
				fmt.Fprintln(stdout, string(b))
				continue
			}
			until := "for ever"
			if s.ExpiresAt != nil {
				until = "until " + s.ExpiresAt.UTC().Format(time.RFC3339)
			}
			fmt.Fprintf(stdout, "%s  %-10s  %s  %s  %s\n", s.CreatedAt.UTC().Format(time.RFC3339), s.Reason, s.RecipientHash, until, s.Source)
		}
		if !*asJSON {
			fmt.Fprintf(stdout, "%d entries\n", len(list))
		}
		return 0, nil
	}

	// A change is recorded: NATS first, so that nothing is done unrecorded.
	nc, js, err := connectJetStream(server(getenv), getenv)
	if err != nil {
		return 1, fmt.Errorf("suppression %s: nothing done: %w", cmd, err)
	}
	defer nc.Close()
	var outcome string
	switch cmd {
	case "add":
		var until *time.Time
		outcome = "added until removed"
		if *forTime > 0 {
			u := time.Now().Add(*forTime).UTC()
			until, outcome = &u, "added for "+forTime.String()
		}
		source := "operator_action:" + randomHex(12)
		if err := issuer.Suppress(ctx, pool, *tenant, subjects.Subject(*tenant, *recipient), source, until); err != nil {
			return 1, fmt.Errorf("suppression add: %w", err)
		}
		fmt.Fprintln(stdout, outcome)
		if _, err := publishOperatorActionAs(ctx, js, source, events.OperatorAction{Action: "suppression.add", Tenant: *tenant, Detail: outcome}); err != nil {
			return 1, notAudited("suppression add", outcome, err)
		}
	case "remove":
		removed, err := issuer.Unsuppress(ctx, pool, *tenant, hashes)
		if errors.Is(err, issuer.ErrNotSuppressed) {
			fmt.Fprintln(stdout, "not suppressed: nothing removed")
			return 1, nil
		}
		if err != nil {
			return 1, fmt.Errorf("suppression remove: %w", err)
		}
		reasons := make([]string, len(removed))
		for i, s := range removed {
			reasons[i] = s.Reason
		}
		outcome = fmt.Sprintf("removed %d entries (%s)", len(removed), strings.Join(reasons, ", "))
		fmt.Fprintln(stdout, outcome)
		if err := publishOperatorAction(ctx, js, "suppression.remove", *tenant, outcome); err != nil {
			return 1, notAudited("suppression remove", outcome, err)
		}
	}
	return 0, nil
}

// devIssuerDB is the file in dev's state directory that holds the issuer role's database
// URL while dev runs: the suppression commands' default.
const devIssuerDB = "issuer.db"

// openIssuerDB connects to the issuer's database at url: --db, else OTP_DATABASE_URL, else
// the issuer role's URL that a running "otpflow dev" wrote to dir.
func openIssuerDB(ctx context.Context, url string, getenv func(string) string, dir string) (*pgxpool.Pool, error) {
	if url == "" {
		url = getenv("OTP_DATABASE_URL")
	}
	if url == "" {
		if b, err := os.ReadFile(filepath.Join(dir, devIssuerDB)); err == nil {
			url = strings.TrimSpace(string(b))
		}
	}
	return platform.OpenPostgres(ctx, url)
}
