package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/testenv"
)

// farHost stands for a host that is not this machine. Its first label is longer than DNS
// allows (63), so Go's resolver (GODEBUG=netdns=go below) rejects it without asking any
// server: even if a check were missing, nothing would leave this machine.
var farHost = strings.Repeat("r", 64) + ".example"

// productionEnv is a production configuration that passes every check: every neighbour
// is on a closed loopback port, so a binary that gets past its checks fails to connect
// to PostgreSQL within a second.
func productionEnv(t *testing.T) map[string]string {
	return map[string]string{
		"PATH": os.Getenv("PATH"), "HOME": os.Getenv("HOME"), "GODEBUG": "netdns=go",
		"OTP_ENV":               "production",
		"OTP_NATS_URL":          "nats://127.0.0.1:1",
		"OTP_DATABASE_URL":      "postgres://otpflow@127.0.0.1:1/otpflow?sslmode=disable",
		"OTP_CONNECT_TIMEOUT":   "1s",
		"OTP_CODE_PEPPER":       keys.Generate("p1", 32),
		"OTP_SEAL_KEY":          keys.Generate("s1", 32),
		"OTP_AUDIT_KEY":         keys.Generate("a1", 32),
		"OTP_AUDIT_CHAIN_KEY":   keys.Generate("c1", 32),
		"OTP_AUDIT_SIGNING_KEY": keys.Generate("sig1", 32),
		"OTP_SUBJECT_KEY":       keys.Generate("k1", 32),
		"OTP_DLQ_KEY":           keys.Generate("d1", 32),
		"OTP_PROVIDERS":         "smtp",
		"OTP_SMTP_URL":          "smtp://127.0.0.1:1?tls=none",
		"OTP_MAIL_FROM":         "Acme <no-reply@acme.example>",
		"AWS_ACCESS_KEY_ID":     "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true",
	}
}

// runToExit runs service bin with env until it exits (at most a minute) and returns its
// combined output.
func runToExit(t *testing.T, bin string, env map[string]string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binaries(t), bin))
	for k, v := range env {
		if v != "" {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// TestProductionRefusesAtStart runs each binary with OTP_ENV=production and one offending
// setting: it exits non-zero with one line naming the setting. The controls show the
// same binaries, without the offending setting, get past every check (they stop later,
// at the closed PostgreSQL port).
func TestProductionRefusesAtStart(t *testing.T) {
	tenants := func(doc string) string { return tenantsFile(t, doc) }
	testRecipients := tenants("tenants:\n  acme:\n    test_recipients:\n      qa@acme.example: \"123456\"\n")
	guessable := tenants("tenants:\n  acme:\n    code_length: 4\n")
	pastChecks := "connect to PostgreSQL at 127.0.0.1:1"

	type tc struct {
		name, bin string
		env       map[string]string
		want      string // what the one line names
	}
	var cases []tc
	for _, bin := range serviceNames {
		cases = append(cases,
			tc{"control", bin, nil, pastChecks},
			tc{"OTP_ENV not a known value", bin, map[string]string{"OTP_ENV": "staging"}, "OTP_ENV"},
			tc{"PostgreSQL sslmode unset to a remote host", bin,
				map[string]string{"OTP_DATABASE_URL": "postgres://otpflow@" + farHost + "/otpflow"}, "OTP_ENV=production: OTP_DATABASE_URL"},
			tc{"PostgreSQL sslmode=disable to a remote host", bin,
				map[string]string{"OTP_DATABASE_URL": "host=" + farHost + " user=otpflow sslmode=disable"}, "OTP_ENV=production: OTP_DATABASE_URL"},
			tc{"libpq environment: PGHOST remote, PGSSLMODE=disable", bin,
				map[string]string{"OTP_DATABASE_URL": "", "PGHOST": farHost, "PGSSLMODE": "disable"}, "OTP_ENV=production: PGSSLMODE"},
			tc{"profiles on the ops endpoint", bin, map[string]string{"OTP_PPROF": "true"}, "OTP_ENV=production: OTP_PPROF"},
			tc{"profiles off (control)", bin, map[string]string{"OTP_PPROF": "false"}, pastChecks},
		)
		if bin == "auditor" {
			continue // it does not read OTP_TENANTS_FILE
		}
		cases = append(cases,
			tc{"test recipients", bin, map[string]string{"OTP_TENANTS_FILE": testRecipients}, "OTP_ENV=production: OTP_TENANTS_FILE gives tenant acme test_recipients"},
			tc{"test recipients allowed (control)", bin, map[string]string{"OTP_TENANTS_FILE": testRecipients, "OTP_ALLOW_TEST_RECIPIENTS": "true"}, pastChecks},
			tc{"a guesser wins 1 in 667", bin, map[string]string{"OTP_TENANTS_FILE": guessable}, "OTP_ENV=production: OTP_TENANTS_FILE gives tenant acme max_attempts"},
		)
	}
	// The dispatch seal key doubling as the DLQ key (both rings, with other ids).
	seal := productionEnv(t)["OTP_SEAL_KEY"]
	sharedDLQ := "d9:" + strings.TrimPrefix(seal, "s1:")
	for _, bin := range []string{"issuer", "dispatcher"} {
		cases = append(cases, tc{"DLQ key shared with the seal key", bin, map[string]string{"OTP_SEAL_KEY": seal, "OTP_DLQ_KEY": keys.Generate("d1", 32) + "," + sharedDLQ},
			"OTP_ENV=production: OTP_DLQ_KEY"})
	}
	cases = append(cases,
		tc{"sandbox provider", "dispatcher", map[string]string{"OTP_PROVIDERS": "sandbox", "OTP_SANDBOX_MAILDIR": t.TempDir()}, "OTP_ENV=production: OTP_PROVIDERS"},
		tc{"sandbox as the fallback", "dispatcher", map[string]string{"OTP_PROVIDERS": "smtp,sandbox", "OTP_SANDBOX_MAILDIR": t.TempDir()}, "OTP_ENV=production: OTP_PROVIDERS"},
		tc{"null provider (the bench's)", "dispatcher", map[string]string{"OTP_PROVIDERS": "null", "OTP_NULL_SINK_ADDR": "127.0.0.1:9"}, "OTP_ENV=production: OTP_PROVIDERS"},
		tc{"null as the fallback", "dispatcher", map[string]string{"OTP_PROVIDERS": "smtp,null"}, "OTP_ENV=production: OTP_PROVIDERS"},
		tc{"SMTP tls=none to a remote relay", "dispatcher", map[string]string{"OTP_SMTP_URL": "smtp://" + farHost + ":25?tls=none"}, "OTP_ENV=production: OTP_SMTP_URL"},
		tc{"SMTP starttls to a remote relay (control)", "dispatcher", map[string]string{"OTP_SMTP_URL": "smtp://" + farHost + ":587?tls=starttls"}, pastChecks},
		tc{"SES endpoint http:// to a remote host", "dispatcher", map[string]string{"OTP_PROVIDERS": "ses", "OTP_SES_REGION": "eu-west-1",
			"OTP_SES_MAX_SEND_RATE": "10", "OTP_SES_ENDPOINT": "http://" + farHost}, "OTP_ENV=production: OTP_SES_ENDPOINT"},
		tc{"SES endpoint http:// to a remote host from the AWS environment", "dispatcher", map[string]string{"OTP_PROVIDERS": "ses", "OTP_SES_REGION": "eu-west-1",
			"OTP_SES_MAX_SEND_RATE": "10", "AWS_ENDPOINT_URL_SESV2": "HTTP://" + farHost + ":8080"}, "OTP_ENV=production: AWS_ENDPOINT_URL_SESV2"},
		tc{"SES endpoint http:// to a local emulator (control)", "dispatcher", map[string]string{"OTP_PROVIDERS": "ses", "OTP_SES_REGION": "eu-west-1",
			"OTP_SES_MAX_SEND_RATE": "10", "OTP_SES_ENDPOINT": "http://127.0.0.1:1"}, pastChecks},
	)

	binaries(t)
	for _, c := range cases {
		t.Run(c.bin+"/"+c.name, func(t *testing.T) {
			t.Parallel()
			env := productionEnv(t)
			for k, v := range c.env {
				env[k] = v
			}
			out, err := runToExit(t, c.bin, env)
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() == 0 {
				t.Fatalf("exit: %v, want a non-zero exit; output:\n%s", err, out)
			}
			lines := strings.Split(out, "\n")
			last := lines[len(lines)-1]
			if !strings.Contains(last, c.want) {
				t.Fatalf("last line %q does not name %q; output:\n%s", last, c.want, out)
			}
			if c.want != pastChecks && len(lines) != 1 {
				t.Errorf("want one line, got:\n%s", out)
			}
		})
	}
}

// TestProductionStartsWithLocalNeighbours: with OTP_ENV=production and every neighbour
// on loopback (PostgreSQL sslmode=disable, plaintext NATS, SMTP tls=none), the four
// binaries start, carry a request through, and stop cleanly.
func TestProductionStartsWithLocalNeighbours(t *testing.T) {
	w := newWorld(t)
	w.env["OTP_ENV"] = "production"
	logs := &testenv.LogBuffer{}
	p := w.startProcesses(t, logs)
	a := newApp(t, w.nats.ClientURL())
	checkFlow(t, w, a, "acme", "prod-1", "prod@example.com")

	// The verifier names the build it runs, not a constant.
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	testenv.Must(t, err, "git rev-parse")
	info, err := a.nc.Request("$SRV.INFO.otp-verifier", nil, 5*time.Second)
	testenv.Must(t, err, "micro info")
	var svc struct {
		Version string `json:"version"`
	}
	testenv.Must(t, json.Unmarshal(info.Data, &svc), "decode info")
	if want := "0.0.0-devel+" + strings.TrimSpace(string(head)); !strings.HasPrefix(svc.Version, want) {
		t.Errorf("verifier version %q, want the build's revision %s", svc.Version, want)
	}
	p.stop(t)
	if strings.Contains(logs.String(), "OTP_ENV=production:") {
		t.Errorf("a check refused a local neighbour:\n%s", logs.String())
	}
}
