package dispatcher

import (
	"log/slog"

	"github.com/otpflow/otpflow/platform"
)

// Spec is the dispatcher as platform's runner starts it: alone (cmd/dispatcher) or beside the other
// services (otpflow dev).
func Spec() platform.ServiceSpec {
	return platform.NewServiceSpec("dispatcher", Schema, Migrations(), LoadConfig,
		func(cfg Config, d *platform.Deps, log *slog.Logger) (platform.Runner, error) {
			cfg.Tracer = d.Tracer
			return New(cfg, d.Pool, d.JS, log, d.Reg)
		})
}
