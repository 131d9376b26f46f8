package issuer

import (
	"log/slog"

	"github.com/otpflow/otpflow/platform"
)

// Spec is the issuer as platform's runner starts it: alone (cmd/issuer) or beside the other
// services (otpflow dev).
func Spec() platform.ServiceSpec {
	return platform.NewServiceSpec("issuer", Schema, Migrations(), LoadConfig,
		func(cfg Config, d *platform.Deps, log *slog.Logger) (platform.Runner, error) {
			cfg.Tracer = d.Tracer
			return New(cfg, d.Pool, d.JS, log, d.Reg)
		})
}
