package auditor

import (
	"log/slog"

	"github.com/otpflow/otpflow/platform"
)

// Spec is the auditor as platform's runner starts it: alone (cmd/auditor) or beside the other
// services (otpflow dev).
func Spec() platform.ServiceSpec {
	s := platform.NewServiceSpec("auditor", Schema, Migrations(), LoadConfig,
		func(cfg Config, d *platform.Deps, log *slog.Logger) (platform.Runner, error) {
			cfg.Tracer = d.Tracer
			return New(cfg, d.Pool, d.JS, log, d.Reg)
		})
	s.Grants = Grants
	return s
}

// Grants are all the auditor's role may do: read the log and append rows to it, and to
// the alert windows. Every other change goes through a function that runs as the log's
// owner and checks what it is asked (migrations/00004_roles.sql, 00005_erasure.sql,
// 00006_alert_windows.sql); no UPDATE, DELETE or TRUNCATE anywhere in audit. It erases
// only through audit.erase_subject, which reads whom to erase from a chained erasure
// request; audit.erase (any hashes) is the owner's alone. It prunes the alert windows
// only through audit.prune_alerts and audit.prune_alert_rules, which touch nothing else.
var Grants = []string{
	"USAGE ON SCHEMA audit",
	"SELECT ON ALL TABLES IN SCHEMA audit",
	"INSERT ON audit.events, audit.alert_stamps, audit.alerts_raised",
	"EXECUTE ON FUNCTION audit.lock_head(), audit.advance_head(bigint, bytea), " +
		"audit.chain_legacy(bigint[], bytea[], bytea[], bytea[], bytea[], text), " +
		"audit.purge(bigint, bytea, text, bytea), audit.erase_subject(bigint), audit.prune_alerts(timestamptz), " +
		"audit.prune_alert_rules(text[], timestamptz[])",
}
