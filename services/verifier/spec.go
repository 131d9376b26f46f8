package verifier

import (
	"log/slog"

	"github.com/otpflow/otpflow/platform"
)

// Spec is the verifier as platform's runner starts it: alone (cmd/verifier) or beside the other
// services (otpflow dev).
func Spec() platform.ServiceSpec {
	return platform.NewServiceSpec("verifier", Schema, Migrations(), LoadConfig,
		func(cfg Config, d *platform.Deps, log *slog.Logger) (platform.Runner, error) {
			cfg.Tracer = d.Tracer
			return New(cfg, d.Pool, d.NC, d.JS, log, d.Reg)
		})
}
