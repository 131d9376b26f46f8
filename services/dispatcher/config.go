package dispatcher

import (
	"context"
	"fmt"
	"net"
	"net/mail"
	"strconv"
	"strings"
	"time"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/services/dispatcher/maildir"
	"github.com/otpflow/otpflow/services/dispatcher/mailer"
	"github.com/otpflow/otpflow/services/dispatcher/nullsink"
	"github.com/otpflow/otpflow/services/dispatcher/ses"
	"github.com/otpflow/otpflow/services/dispatcher/sesfeedback"
	"github.com/otpflow/otpflow/services/dispatcher/smtp"
)

// DefaultConcurrency is Config.Concurrency's default (OTP_DISPATCH_CONCURRENCY).
const DefaultConcurrency = 16

// LoadConfig reads the dispatcher's settings and builds the provider chain of
// OTP_PROVIDERS. A missing or malformed setting is an error that names its variable.
func LoadConfig(getenv platform.Getenv, common platform.Common) (Config, error) {
	sealer, err := keys.ParseSealer(getenv("OTP_SEAL_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_SEAL_KEY", Msg: err.Error()}
	}
	subjects, err := keys.ParseSubjects(getenv("OTP_SUBJECT_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_SUBJECT_KEY", Msg: err.Error()}
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
	from := strings.TrimSpace(getenv("OTP_MAIL_FROM"))
	if from == "" {
		return Config{}, &platform.ConfigError{Var: "OTP_MAIL_FROM", Msg: "not set"}
	}
	if _, err := mail.ParseAddress(from); err != nil || strings.ContainsAny(from, "\r\n") {
		return Config{}, &platform.ConfigError{Var: "OTP_MAIL_FROM", Msg: "must be an address such as Acme <no-reply@acme.example>"}
	}
	concurrency, err := platform.IntVar(getenv, "OTP_DISPATCH_CONCURRENCY", DefaultConcurrency, 1, 1000)
	if err != nil {
		return Config{}, err
	}
	budget, err := platform.DurationVar(getenv, "OTP_SEND_RETRY_BUDGET", 2*time.Second)
	if err != nil {
		return Config{}, err
	}
	breakerTimeout, err := platform.DurationVar(getenv, "OTP_BREAKER_OPEN_TIMEOUT", 30*time.Second)
	if err != nil {
		return Config{}, err
	}
	policies, err := policy.Load(getenv("OTP_TENANTS_FILE"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_TENANTS_FILE", Msg: err.Error()}
	}
	if err := platform.CheckPolicies(common, policies); err != nil {
		return Config{}, err
	}
	cfg := Config{Sealer: sealer, Subjects: subjects, DLQKey: dlq, From: from, Concurrency: concurrency, TemplateDir: getenv("OTP_TEMPLATES_DIR"), Policies: policies,
		Guards: map[string]mailer.GuardConfig{}, RateSources: map[string]func(context.Context) (float64, error){},
		Streams: common.Streams()}
	guard := func(rateVar string) (mailer.GuardConfig, error) {
		r, err := floatVar(getenv, rateVar)
		return mailer.GuardConfig{RetryBudget: budget, BreakerTimeout: breakerTimeout, Rate: r}, err
	}
	if url := strings.TrimSpace(getenv("OTP_SES_FEEDBACK_QUEUE_URL")); url != "" {
		if !strings.HasPrefix(url, "https://") && !strings.HasPrefix(url, "http://") {
			return Config{}, &platform.ConfigError{Var: "OTP_SES_FEEDBACK_QUEUE_URL", Msg: "must be the queue's URL, https://sqs.<region>.amazonaws.com/<account>/<name>"}
		}
		if common.Production() {
			// The notifications name people and the queue's requests are signed: no clear text.
			if err := platform.CheckSESEndpointFrom("OTP_SQS_ENDPOINT", getenv("OTP_SQS_ENDPOINT")); err != nil {
				return Config{}, err
			}
			if err := platform.CheckSESEndpointFrom("OTP_SES_FEEDBACK_QUEUE_URL", url); err != nil {
				return Config{}, err
			}
		}
		client, err := sesfeedback.NewSQSClient(context.Background(), getenv("OTP_SES_REGION"), getenv("OTP_SQS_ENDPOINT"))
		if err != nil {
			return Config{}, &platform.ConfigError{Var: "OTP_SES_FEEDBACK_QUEUE_URL", Msg: err.Error()}
		}
		if ep := client.Options().BaseEndpoint; common.Production() && ep != nil && getenv("OTP_SQS_ENDPOINT") == "" {
			if err := platform.CheckSESEndpointFrom("AWS_ENDPOINT_URL_SQS (or AWS_ENDPOINT_URL, or endpoint_url in the AWS config)", *ep); err != nil {
				return Config{}, err
			}
		}
		cfg.FeedbackQueue, cfg.FeedbackQueueURL = client, url
		// The tags' MAC (OTP_SUBJECT_KEY, required above in any env) says which mail a
		// notification is about; the SNS signature, what happened to it.
		switch topic := strings.TrimSpace(getenv("OTP_SES_FEEDBACK_TOPIC_ARN")); {
		case topic != "":
			if cfg.FeedbackSignatures, err = sesfeedback.NewVerifier(topic, sesfeedback.HTTPSFetch(nil)); err != nil {
				return Config{}, &platform.ConfigError{Var: "OTP_SES_FEEDBACK_TOPIC_ARN", Msg: err.Error()}
			}
		case common.Production():
			return Config{}, &platform.ProductionError{Setting: "OTP_SES_FEEDBACK_TOPIC_ARN", Reason: "is not set, and OTP_SES_FEEDBACK_QUEUE_URL is: " +
				"name the SNS topic of the configuration set's event destination, so that only notifications SNS signed for it are taken"}
		}
	} else if strings.TrimSpace(getenv("OTP_SES_FEEDBACK_TOPIC_ARN")) != "" {
		return Config{}, &platform.ConfigError{Var: "OTP_SES_FEEDBACK_TOPIC_ARN", Msg: "set without OTP_SES_FEEDBACK_QUEUE_URL, the queue subscribed to the topic"}
	}
	names := strings.TrimSpace(getenv("OTP_PROVIDERS"))
	if names == "" {
		return Config{}, &platform.ConfigError{Var: "OTP_PROVIDERS", Msg: "not set; name the provider chain, e.g. smtp or sandbox"}
	}
	chain := strings.Split(names, ",")
	for i := range chain {
		chain[i] = strings.TrimSpace(chain[i])
	}
	if common.Production() {
		if err := platform.CheckProviders(chain); err != nil {
			return Config{}, err
		}
	}
	seen := map[string]bool{}
	for _, name := range chain {
		if seen[name] {
			return Config{}, &platform.ConfigError{Var: "OTP_PROVIDERS", Msg: fmt.Sprintf("%q is listed twice", name)}
		}
		seen[name] = true
		switch name {
		case "ses":
			sc := ses.Config{Region: getenv("OTP_SES_REGION"), Endpoint: getenv("OTP_SES_ENDPOINT"),
				ConfigurationSet: getenv("OTP_SES_CONFIGURATION_SET")}
			if common.Production() {
				if err := platform.CheckSESEndpoint(sc.Endpoint); err != nil {
					return Config{}, err
				}
			}
			client, err := ses.NewClient(context.Background(), sc)
			if err != nil {
				return Config{}, &platform.ConfigError{Var: "OTP_SES_REGION", Msg: err.Error()}
			}
			if ep := client.Options().BaseEndpoint; common.Production() && ep != nil && sc.Endpoint == "" {
				if err := platform.CheckSESEndpointFrom("AWS_ENDPOINT_URL_SESV2 (or AWS_ENDPOINT_URL, or endpoint_url in the AWS config)", *ep); err != nil {
					return Config{}, err
				}
			}
			if cfg.Guards["ses"], err = guard("OTP_SES_MAX_SEND_RATE"); err != nil {
				return Config{}, err
			}
			if cfg.Guards["ses"].Rate == 0 {
				cfg.RateSources["ses"] = func(ctx context.Context) (float64, error) { return ses.MaxSendRate(ctx, client) }
			}
			cfg.Providers = append(cfg.Providers, ses.New(client, sc))
		case "smtp":
			raw := getenv("OTP_SMTP_URL")
			if raw == "" {
				return Config{}, &platform.ConfigError{Var: "OTP_SMTP_URL", Msg: "not set, and OTP_PROVIDERS names smtp"}
			}
			sc, err := smtp.ParseURL(raw)
			if err != nil {
				return Config{}, &platform.ConfigError{Var: "OTP_SMTP_URL", Msg: err.Error()}
			}
			if common.Production() {
				if err := platform.CheckSMTP(sc.Host, sc.TLS); err != nil {
					return Config{}, err
				}
			}
			if cfg.Guards["smtp"], err = guard("OTP_SMTP_MAX_SEND_RATE"); err != nil {
				return Config{}, err
			}
			cfg.Providers = append(cfg.Providers, smtp.New(sc))
		case "sandbox":
			dir := getenv("OTP_SANDBOX_MAILDIR")
			if dir == "" {
				return Config{}, &platform.ConfigError{Var: "OTP_SANDBOX_MAILDIR", Msg: "not set, and OTP_PROVIDERS names sandbox"}
			}
			p, err := maildir.New(dir)
			if err != nil {
				return Config{}, &platform.ConfigError{Var: "OTP_SANDBOX_MAILDIR", Msg: err.Error()}
			}
			cfg.Guards["sandbox"] = mailer.GuardConfig{RetryBudget: budget, BreakerTimeout: breakerTimeout}
			cfg.Providers = append(cfg.Providers, p)
		case "null":
			delay, err := platform.DurationVar(getenv, "OTP_NULL_SEND_DELAY", 0)
			if err != nil {
				return Config{}, err
			}
			addr := strings.TrimSpace(getenv("OTP_NULL_SINK_ADDR"))
			if addr != "" {
				if _, _, err := net.SplitHostPort(addr); err != nil {
					return Config{}, &platform.ConfigError{Var: "OTP_NULL_SINK_ADDR", Msg: "must be host:port of the collector"}
				}
			}
			cfg.Guards["null"] = mailer.GuardConfig{RetryBudget: budget, BreakerTimeout: breakerTimeout}
			cfg.Providers = append(cfg.Providers, nullsink.New(nullsink.Config{Addr: addr, Delay: delay}))
		default:
			return Config{}, &platform.ConfigError{Var: "OTP_PROVIDERS", Msg: fmt.Sprintf("unknown provider %q; the providers are ses, smtp, sandbox and null", name)}
		}
	}
	return cfg, nil
}

func floatVar(getenv platform.Getenv, name string) (float64, error) {
	v := strings.TrimSpace(getenv(name))
	if v == "" {
		return 0, nil
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f <= 0 {
		return 0, &platform.ConfigError{Var: name, Msg: "must be a positive number of messages per second"}
	}
	return f, nil
}
