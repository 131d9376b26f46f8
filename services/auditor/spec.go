package auditor

import (
	"log/slog"

	"github.com/otpflow/otpflow/platform"
)

// Spec is the auditor as platform's runner starts it: alone (cmd/auditor) or beside the other
// services (otpflow dev).
func Spec() platform.ServiceSpec {
	return platform.NewServiceSpec("auditor", Schema, Migrations(), LoadConfig,
		func(cfg Config, d *platform.Deps, log *slog.Logger) (platform.Runner, error) {
			return New(cfg, d.Pool, d.JS, log, d.Reg)
		})
}
