package verifier

import (
	"errors"
	"testing"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

func TestLoadConfigVerifyLimits(t *testing.T) {
	pepper, subjectKey, dlqKey := keys.Generate("p1", 32), keys.Generate("k1", 32), keys.Generate("d1", 32)
	for _, tc := range []struct {
		name       string
		env        map[string]string
		ip, tenant int
		// group: OTP_VERIFY_TRANSACTIONS and OTP_VERIFY_GROUP_SIZE, when the case sets them.
		group  [2]int
		badVar string
	}{
		{name: "defaults", ip: DefaultVerifyIPPerMinute, tenant: 0},
		{name: "set", env: map[string]string{"OTP_VERIFY_IP_PER_MINUTE": "30", "OTP_VERIFY_TENANT_PER_MINUTE": "6000"}, ip: 30, tenant: 6000},
		{name: "0 turns the IP limit off", env: map[string]string{"OTP_VERIFY_IP_PER_MINUTE": "0"}, ip: -1},
		{name: "malformed", env: map[string]string{"OTP_VERIFY_IP_PER_MINUTE": "lots"}, badVar: "OTP_VERIFY_IP_PER_MINUTE"},
		{name: "negative", env: map[string]string{"OTP_VERIFY_TENANT_PER_MINUTE": "-1"}, badVar: "OTP_VERIFY_TENANT_PER_MINUTE"},
		{name: "groups by default", ip: DefaultVerifyIPPerMinute, group: [2]int{defaultVerifyTransactions, defaultVerifyGroupSize}},
		{name: "groups set", env: map[string]string{"OTP_VERIFY_TRANSACTIONS": "8", "OTP_VERIFY_GROUP_SIZE": "1"}, ip: DefaultVerifyIPPerMinute, group: [2]int{8, 1}},
		{name: "no transactions", env: map[string]string{"OTP_VERIFY_TRANSACTIONS": "0"}, badVar: "OTP_VERIFY_TRANSACTIONS"},
		{name: "huge groups", env: map[string]string{"OTP_VERIFY_GROUP_SIZE": "5000"}, badVar: "OTP_VERIFY_GROUP_SIZE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			getenv := func(k string) string {
				switch k {
				case "OTP_CODE_PEPPER":
					return pepper
				case "OTP_SUBJECT_KEY":
					return subjectKey
				case "OTP_DLQ_KEY":
					return dlqKey
				}
				return tc.env[k]
			}
			cfg, err := LoadConfig(getenv, platform.Common{Replicas: 1})
			var ce *platform.ConfigError
			switch {
			case tc.badVar != "":
				if !errors.As(err, &ce) || ce.Var != tc.badVar {
					t.Fatalf("err %v, want a ConfigError naming %s", err, tc.badVar)
				}
			case err != nil:
				t.Fatal(err)
			case cfg.VerifyIPPerMinute != tc.ip || cfg.VerifyTenantPerMinute != tc.tenant:
				t.Fatalf("ip %d tenant %d, want %d %d", cfg.VerifyIPPerMinute, cfg.VerifyTenantPerMinute, tc.ip, tc.tenant)
			case tc.group != [2]int{} && (cfg.VerifyTransactions != tc.group[0] || cfg.VerifyGroupSize != tc.group[1]):
				t.Fatalf("groups %d × %d, want %v", cfg.VerifyTransactions, cfg.VerifyGroupSize, tc.group)
			}
		})
	}
}

func TestLoadConfigStatusPace(t *testing.T) {
	pepper, subjectKey, dlqKey := keys.Generate("p1", 32), keys.Generate("k1", 32), keys.Generate("d1", 32)
	for _, tc := range []struct {
		name, value string
		want        int
		bad         bool
	}{
		{name: "default", want: DefaultStatusTenantPerMinute},
		{name: "set", value: "120", want: 120},
		{name: "0 turns it off", value: "0", want: -1},
		{name: "negative", value: "-5", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"OTP_CODE_PEPPER": pepper, "OTP_SUBJECT_KEY": subjectKey, "OTP_DLQ_KEY": dlqKey,
				"OTP_STATUS_TENANT_PER_MINUTE": tc.value}
			cfg, err := LoadConfig(func(k string) string { return env[k] }, platform.Common{Replicas: 1})
			var ce *platform.ConfigError
			switch {
			case tc.bad:
				if !errors.As(err, &ce) || ce.Var != "OTP_STATUS_TENANT_PER_MINUTE" {
					t.Fatalf("err %v, want a ConfigError naming OTP_STATUS_TENANT_PER_MINUTE", err)
				}
			case err != nil:
				t.Fatal(err)
			case cfg.StatusTenantPerMinute != tc.want:
				t.Fatalf("status pace %d, want %d", cfg.StatusTenantPerMinute, tc.want)
			}
		})
	}
}

// TestOnlyTheStatusProjectionLingers: the challenge projections hand their batches over
// at once, since a verify may be waiting for its code (the fence); the status projection
// waits DefaultStatusLinger for fuller batches.
func TestOnlyTheStatusProjectionLingers(t *testing.T) {
	s := &Service{cfg: Config{StatusLinger: DefaultStatusLinger, BatchSize: 100}, store: &store{}}
	challenges, legacy, status := s.consumeConfigs()
	if challenges.Linger != 0 || legacy.Linger != 0 {
		t.Errorf("the challenge projections linger %v and %v, want none", challenges.Linger, legacy.Linger)
	}
	if status.Linger != DefaultStatusLinger || status.Name != events.VerifierStatusConsumer.Durable {
		t.Errorf("status consumer %q lingers %v, want %v", status.Name, status.Linger, DefaultStatusLinger)
	}
	if challenges.Name != events.ConsumerVerifier || challenges.BatchSize != 100 || challenges.Healthy == nil || challenges.DeadLetters == nil {
		t.Errorf("challenge consumer %+v", challenges)
	}
}
