package auditor

import (
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// LoadConfig reads the auditor's settings. OTP_AUDIT_KEY (at least 32 bytes, base64) keys
// the recipient hash.
func LoadConfig(getenv platform.Getenv, common platform.Common) (Config, error) {
	ring, err := keys.Parse(getenv("OTP_AUDIT_KEY"), 32, 0)
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_AUDIT_KEY", Msg: err.Error()}
	}
	alerts, err := ParseThresholds(getenv("OTP_ALERT_RULES"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_ALERT_RULES", Msg: err.Error()}
	}
	return Config{RecipientKey: ring.Key(ring.ActiveID()), Alerts: alerts, Streams: events.StreamOptions{Replicas: common.Replicas}}, nil
}
