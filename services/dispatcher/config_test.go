package dispatcher

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// TestFeedbackSettings: with OTP_SES_FEEDBACK_QUEUE_URL, OTP_SES_FEEDBACK_TOPIC_ARN makes
// the dispatcher take only notifications SNS signed for that topic; production refuses
// to start without it, and every env refuses a queue without OTP_SUBJECT_KEY (the tags'
// MAC). Outside production without a topic, unsigned notifications are taken (a local
// emulator), as before.
func TestFeedbackSettings(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	const (
		queueURL = "https://sqs.eu-west-1.amazonaws.com/123456789012/otp-feedback"
		topic    = "arn:aws:sns:eu-west-1:123456789012:otp-feedback"
	)
	for _, tc := range []struct {
		name       string
		production bool
		env        map[string]string
		wantVar    string // the setting refused; "" when it starts
		signatures bool   // whether notifications are verified
	}{
		{"production with the topic", true, map[string]string{"OTP_SES_FEEDBACK_TOPIC_ARN": topic}, "", true},
		{"production without the topic", true, nil, "OTP_SES_FEEDBACK_TOPIC_ARN", false},
		{"development with the topic", false, map[string]string{"OTP_SES_FEEDBACK_TOPIC_ARN": topic}, "", true},
		{"development without the topic", false, nil, "", false},
		{"a topic that is not an SNS topic's ARN", false, map[string]string{"OTP_SES_FEEDBACK_TOPIC_ARN": "arn:aws:sqs:eu-west-1:123456789012:otp-feedback"}, "OTP_SES_FEEDBACK_TOPIC_ARN", false},
		{"a topic without a queue", false, map[string]string{"OTP_SES_FEEDBACK_TOPIC_ARN": topic, "OTP_SES_FEEDBACK_QUEUE_URL": ""}, "OTP_SES_FEEDBACK_TOPIC_ARN", false},
		{"production, the queue without a subject key", true, map[string]string{"OTP_SES_FEEDBACK_TOPIC_ARN": topic, "OTP_SUBJECT_KEY": ""}, "OTP_SUBJECT_KEY", false},
		{"development, the queue without a subject key", false, map[string]string{"OTP_SUBJECT_KEY": ""}, "OTP_SUBJECT_KEY", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{
				"OTP_SEAL_KEY": keys.Generate("s1", 32), "OTP_SUBJECT_KEY": keys.Generate("k1", 32), "OTP_DLQ_KEY": keys.Generate("d1", 32),
				"OTP_MAIL_FROM": "Acme <no-reply@acme.example>", "OTP_PROVIDERS": "smtp", "OTP_SMTP_URL": "smtp://127.0.0.1:1?tls=none",
				"OTP_SES_REGION": "eu-west-1", "OTP_SES_FEEDBACK_QUEUE_URL": queueURL,
			}
			for k, v := range tc.env {
				env[k] = v
			}
			common := platform.Common{Env: platform.EnvDevelopment}
			if tc.production {
				common.Env = platform.EnvProduction
			}
			cfg, err := LoadConfig(func(k string) string { return env[k] }, common)
			if tc.wantVar == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if (cfg.FeedbackSignatures != nil) != tc.signatures {
					t.Fatalf("signatures checked: %v, want %v", cfg.FeedbackSignatures != nil, tc.signatures)
				}
				return
			}
			var ce *platform.ConfigError
			var pe *platform.ProductionError
			switch {
			case errors.As(err, &ce) && ce.Var == tc.wantVar, errors.As(err, &pe) && pe.Setting == tc.wantVar:
			default:
				t.Fatalf("err %v, want a refusal of %s", err, tc.wantVar)
			}
		})
	}
}
