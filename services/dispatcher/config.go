package dispatcher

import (
	"fmt"
	"net/mail"
	"strings"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/services/dispatcher/maildir"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/smtp"
)

// LoadConfig reads the dispatcher's settings and builds the provider chain of
// OTP_PROVIDERS. A missing or malformed setting is an error that names its variable.
func LoadConfig(getenv platform.Getenv, common platform.Common) (Config, error) {
	sealer, err := keys.ParseSealer(getenv("OTP_SEAL_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_SEAL_KEY", Msg: err.Error()}
	}
	from := strings.TrimSpace(getenv("OTP_MAIL_FROM"))
	if from == "" {
		return Config{}, &platform.ConfigError{Var: "OTP_MAIL_FROM", Msg: "not set"}
	}
	if _, err := mail.ParseAddress(from); err != nil || strings.ContainsAny(from, "\r\n") {
		return Config{}, &platform.ConfigError{Var: "OTP_MAIL_FROM", Msg: "must be an address such as Acme <no-reply@acme.example>"}
	}
	concurrency, err := platform.IntVar(getenv, "OTP_DISPATCH_CONCURRENCY", 16, 1, 1000)
	if err != nil {
		return Config{}, err
	}
	names := strings.TrimSpace(getenv("OTP_PROVIDERS"))
	if names == "" {
		return Config{}, &platform.ConfigError{Var: "OTP_PROVIDERS", Msg: "not set; name the provider chain, e.g. smtp or sandbox"}
	}
	var providers []mailer.Provider
	seen := map[string]bool{}
	for _, name := range strings.Split(names, ",") {
		name = strings.TrimSpace(name)
		if seen[name] {
			return Config{}, &platform.ConfigError{Var: "OTP_PROVIDERS", Msg: fmt.Sprintf("%q is listed twice", name)}
		}
		seen[name] = true
		switch name {
		case "smtp":
			raw := getenv("OTP_SMTP_URL")
			if raw == "" {
				return Config{}, &platform.ConfigError{Var: "OTP_SMTP_URL", Msg: "not set, and OTP_PROVIDERS names smtp"}
			}
			cfg, err := smtp.ParseURL(raw)
			if err != nil {
				return Config{}, &platform.ConfigError{Var: "OTP_SMTP_URL", Msg: err.Error()}
			}
			providers = append(providers, smtp.New(cfg))
		case "sandbox":
			dir := getenv("OTP_SANDBOX_MAILDIR")
			if dir == "" {
				return Config{}, &platform.ConfigError{Var: "OTP_SANDBOX_MAILDIR", Msg: "not set, and OTP_PROVIDERS names sandbox"}
			}
			p, err := maildir.New(dir)
			if err != nil {
				return Config{}, &platform.ConfigError{Var: "OTP_SANDBOX_MAILDIR", Msg: err.Error()}
			}
			providers = append(providers, p)
		default:
			return Config{}, &platform.ConfigError{Var: "OTP_PROVIDERS", Msg: fmt.Sprintf("unknown provider %q; this build has smtp and sandbox", name)}
		}
	}
	return Config{Sealer: sealer, Providers: providers, From: from, Concurrency: concurrency,
		Streams: events.StreamOptions{Replicas: common.Replicas}}, nil
}
