package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
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
          or --hash shows one person's entries
  add     suppress a recipient by hand (reason operator): their requests are refused
          with reason suppressed; --for bounds it (default: until removed). An entry
          that already lasts as long is left as it is
  remove  take a recipient off the list (--recipient or --hash), or every entry of a
          --reason and/or made --since a time (after a false alarm: a broken DKIM
          record makes every mail bounce)

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
		recipient = fs.String("recipient", "", "the recipient's address")
		hash      = fs.String("hash", "", "the recipient's subject hash (\"id:base64url\"), as list and the audit show it")
		reason    = fs.String("reason", "", "remove: every entry of this reason (bounced, complained, operator)")
		since     = fs.String("since", "", "remove: every entry made at or after this time (RFC 3339)")
		forTime   = fs.Duration("for", 0, "add: how long the entry lasts (0: until removed), on the database's clock")
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
	switch {
	case *recipient != "" && *hash != "":
		return 2, fmt.Errorf("suppression %s: --recipient or --hash, not both", cmd)
	case *hash != "" && !events.IsSubjectHash(*hash):
		return 2, fmt.Errorf("suppression %s: --hash is not a subject hash (\"id:base64url\")", cmd)
	case cmd == "add" && *recipient == "" && *hash == "":
		return 2, errors.New("suppression add: --recipient or --hash is required")
	case cmd == "remove" && *recipient == "" && *hash == "" && *reason == "" && *since == "":
		return 2, errors.New("suppression remove: name the entries: --recipient, --hash, --reason or --since")
	case *reason != "" && *reason != issuer.SuppressedBounced && *reason != issuer.SuppressedComplained && *reason != issuer.SuppressedOperator:
		return 2, fmt.Errorf("suppression %s: --reason must be bounced, complained or operator", cmd)
	}
	var sinceTime time.Time
	if *since != "" {
		t, err := time.Parse(time.RFC3339, *since)
		if err != nil {
			return 2, fmt.Errorf("suppression %s: --since: %w", cmd, err)
		}
		sinceTime = t
	}
	if *forTime < 0 {
		return 2, fmt.Errorf("suppression %s: --for must not be negative", cmd)
	}
	var hashes []string
	var subjects *keys.Subjects // set when the recipient is named by address
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
	if *hash != "" {
		hashes = []string{*hash}
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
			until := "until removed"
			switch {
			case s.ExpiresAt != nil:
				until = "until " + s.ExpiresAt.UTC().Format(time.RFC3339)
			case s.Reason != issuer.SuppressedOperator:
				until = "by the tenant's suppression.expiry"
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
		target := *hash
		if subjects != nil {
			target = subjects.Subject(*tenant, *recipient)
		}
		source := "operator_action:" + randomHex(12)
		added, err := issuer.Suppress(ctx, pool, *tenant, target, source, *forTime)
		if err != nil {
			return 1, fmt.Errorf("suppression add: %w", err)
		}
		if !added {
			fmt.Fprintln(stdout, "already suppressed for at least as long: left as it is")
			return 0, nil
		}
		outcome = "added until removed"
		if *forTime > 0 {
			outcome = "added for " + forTime.String()
		}
		fmt.Fprintln(stdout, outcome)
		if _, err := publishOperatorActionAs(ctx, js, source, events.OperatorAction{Action: "suppression.add", Tenant: *tenant, Detail: outcome}); err != nil {
			return 1, notAudited("suppression add", outcome, err)
		}
	case "remove":
		removed, err := issuer.Unsuppress(ctx, pool, *tenant, issuer.Unlist{Hashes: hashes, Reason: *reason, Since: sinceTime})
		if errors.Is(err, issuer.ErrNotSuppressed) {
			fmt.Fprintln(stdout, "not suppressed: nothing removed")
			return 1, nil
		}
		if err != nil {
			return 1, fmt.Errorf("suppression remove: %w", err)
		}
		counts := map[string]int{}
		for _, s := range removed {
			counts[s.Reason]++
		}
		var parts []string
		for _, r := range []string{issuer.SuppressedBounced, issuer.SuppressedComplained, issuer.SuppressedOperator} {
			if counts[r] > 0 {
				parts = append(parts, fmt.Sprintf("%d %s", counts[r], r))
			}
		}
		outcome = fmt.Sprintf("removed %d entries (%s)", len(removed), strings.Join(parts, ", "))
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
	return openRoleDB(ctx, url, getenv, filepath.Join(dir, devIssuerDB))
}
