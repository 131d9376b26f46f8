package verifier

import (
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/events/policy"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// LoadConfig reads the verifier's settings from the environment.
func LoadConfig(getenv platform.Getenv, common platform.Common) (Config, error) {
	pepper, err := keys.ParsePepper(getenv("OTP_CODE_PEPPER"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_CODE_PEPPER", Msg: err.Error()}
	}
	retention, err := platform.DurationVar(getenv, "OTP_RETENTION", platform.Retention)
	if err != nil {
		return Config{}, err
	}
	policies, err := policy.Load(getenv("OTP_TENANTS_FILE"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_TENANTS_FILE", Msg: err.Error()}
	}
	return Config{Pepper: pepper, Policies: policies, Retention: retention, Streams: events.StreamOptions{Replicas: common.Replicas}}, nil
}
