package auditor

import (
	"fmt"
	"time"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// LoadConfig reads the auditor's settings. OTP_AUDIT_KEY (at least 32 bytes, base64)
// derives the salts of the personal-data digests; OTP_SUBJECT_KEY is the subject key ring
// that recipients and clients are known by; OTP_AUDIT_CHAIN_KEY keys the hash chain; OTP_AUDIT_SIGNING_KEY (an
// Ed25519 seed) signs its checkpoints, published every OTP_AUDIT_CHECKPOINT_INTERVAL and
// every OTP_AUDIT_CHECKPOINT_ROWS rows; OTP_AUDIT_VERIFY_INTERVAL schedules the check.
func LoadConfig(getenv platform.Getenv, common platform.Common) (Config, error) {
	ring, err := keys.Parse(getenv("OTP_AUDIT_KEY"), 32, 0)
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_AUDIT_KEY", Msg: err.Error()}
	}
	subjects, err := keys.ParseSubjects(getenv("OTP_SUBJECT_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_SUBJECT_KEY", Msg: err.Error()}
	}
	chain, err := ParseChainKey(getenv("OTP_AUDIT_CHAIN_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_AUDIT_CHAIN_KEY", Msg: err.Error()}
	}
	signer, err := ParseSigningKey(getenv("OTP_AUDIT_SIGNING_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_AUDIT_SIGNING_KEY", Msg: err.Error()}
	}
	dlq, err := platform.LoadDLQKey(getenv)
	if err != nil {
		return Config{}, err
	}
	alerts, err := ParseThresholds(getenv("OTP_ALERT_RULES"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_ALERT_RULES", Msg: err.Error()}
	}
	cfg := Config{RecipientKey: ring.Key(ring.ActiveID()), Chain: chain, Signer: signer, Alerts: alerts, Subjects: subjects, DLQKey: dlq,
		Streams: common.Streams()}
	for _, d := range []struct {
		name string
		to   *time.Duration
	}{{"OTP_AUDIT_CHECKPOINT_INTERVAL", &cfg.CheckpointEvery}, {"OTP_AUDIT_VERIFY_INTERVAL", &cfg.VerifyEvery}} {
		if v := getenv(d.name); v != "" {
			if *d.to, err = time.ParseDuration(v); err != nil || *d.to <= 0 {
				return Config{}, &platform.ConfigError{Var: d.name, Msg: "must be a positive duration, e.g. 10s"}
			}
		}
	}
	if v := getenv("OTP_AUDIT_CHECKPOINT_ROWS"); v != "" {
		if _, err := fmt.Sscan(v, &cfg.CheckpointRows); err != nil || cfg.CheckpointRows < 1 {
			return Config{}, &platform.ConfigError{Var: "OTP_AUDIT_CHECKPOINT_ROWS", Msg: "must be a positive number of rows"}
		}
	}
	return cfg, nil
}
