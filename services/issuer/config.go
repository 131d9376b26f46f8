package issuer

import (
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
)

// LoadConfig reads the issuer's settings from the environment. A missing or malformed
// secret is an error that names its variable; with OTP_ENV=production, so is a tenants
// file that production refuses (platform.CheckPolicies).
func LoadConfig(getenv platform.Getenv, common platform.Common) (Config, error) {
	pepper, err := keys.ParsePepper(getenv("OTP_CODE_PEPPER"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_CODE_PEPPER", Msg: err.Error()}
	}
	sealer, err := keys.ParseSealer(getenv("OTP_SEAL_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_SEAL_KEY", Msg: err.Error()}
	}
	subjects, err := keys.ParseSubjects(getenv("OTP_SUBJECT_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_SUBJECT_KEY", Msg: err.Error()}
	}
	batch, err := platform.IntVar(getenv, "OTP_ISSUER_BATCH", DefaultBatchSize, 1, 1000)
	if err != nil {
		return Config{}, err
	}
	retention, err := platform.DurationVar(getenv, "OTP_RETENTION", platform.Retention)
	if err != nil {
		return Config{}, err
	}
	dlq, err := platform.LoadDLQKey(getenv)
	if err != nil {
		return Config{}, err
	}
	if common.Production() {
		if err := platform.CheckDLQKey(dlq, sealer); err != nil {
			return Config{}, err
		}
	}
	streams := common.Streams()
	lagAlert, err := platform.DurationVar(getenv, "OTP_REQUESTS_LAG_ALERT", streams.RequestsAge()/2)
	if err != nil {
		return Config{}, err
	}
	if lagAlert >= streams.RequestsAge() {
		return Config{}, &platform.ConfigError{Var: "OTP_REQUESTS_LAG_ALERT", Msg: "must be shorter than OTP_REQUESTS_MAX_AGE"}
	}
	policies, err := policy.Load(getenv("OTP_TENANTS_FILE"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_TENANTS_FILE", Msg: err.Error()}
	}
	// The production rules of the tenants file (test recipients, a guesser's odds).
	if err := platform.CheckPolicies(common, policies); err != nil {
		return Config{}, err
	}
	return Config{Pepper: pepper, Sealer: sealer, Subjects: subjects, Policies: policies, Retention: retention, BatchSize: batch, DLQKey: dlq,
		Streams: streams, LagAlert: lagAlert}, nil
}
