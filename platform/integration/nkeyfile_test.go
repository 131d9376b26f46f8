package platform_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/testenv"
)

// TestNATSNkeyFile: OTP_NATS_NKEY_FILE names a readable user seed; it is one way of
// authenticating, not to be combined with OTP_NATS_CREDS or a user in the URL; in
// production other users of the machine must not be able to read it.
func TestNATSNkeyFile(t *testing.T) {
	dir := t.TempDir()
	kp, err := nkeys.CreateUser()
	testenv.Must(t, err, "nkey")
	seed, err := kp.Seed()
	testenv.Must(t, err, "seed")
	private, open, notSeed := filepath.Join(dir, "private.seed"), filepath.Join(dir, "open.seed"), filepath.Join(dir, "pub")
	testenv.Must(t, os.WriteFile(private, seed, 0o600), "write")
	testenv.Must(t, os.WriteFile(open, seed, 0o644), "write")
	pub, _ := kp.PublicKey()
	testenv.Must(t, os.WriteFile(notSeed, []byte(pub), 0o600), "write")
	// Group-readable, as a Kubernetes secret volume with fsGroup leaves it: accepted when
	// the group is this process's own, refused for another group.
	ownGroup, otherGroup := filepath.Join(dir, "own-group.seed"), filepath.Join(dir, "other-group.seed")
	for _, f := range []string{ownGroup, otherGroup} {
		testenv.Must(t, os.WriteFile(f, seed, 0o600), "write")
		testenv.Must(t, os.Chmod(f, 0o440), "chmod")
	}
	testenv.Must(t, os.Chown(ownGroup, -1, os.Getegid()), "chown")
	testenv.Must(t, os.Chown(otherGroup, -1, os.Getegid()+4242), "chown")

	for _, tc := range []struct {
		name string
		env  map[string]string
		want string // the variable named by the error; "" for none
		prod bool   // a *platform.ProductionError
	}{
		{"seed", map[string]string{"OTP_NATS_NKEY_FILE": private}, "", false},
		{"seed readable by others in development", map[string]string{"OTP_NATS_NKEY_FILE": open}, "", false},
		{"seed readable by others in production", map[string]string{"OTP_NATS_NKEY_FILE": open, "OTP_ENV": "production"}, "OTP_NATS_NKEY_FILE", true},
		{"private seed in production", map[string]string{"OTP_NATS_NKEY_FILE": private, "OTP_ENV": "production"}, "", false},
		{"seed readable by its own group in production", map[string]string{"OTP_NATS_NKEY_FILE": ownGroup, "OTP_ENV": "production"}, "", false},
		{"seed readable by another group in production", map[string]string{"OTP_NATS_NKEY_FILE": otherGroup, "OTP_ENV": "production"}, "OTP_NATS_NKEY_FILE", true},
		{"missing file", map[string]string{"OTP_NATS_NKEY_FILE": filepath.Join(dir, "none")}, "OTP_NATS_NKEY_FILE", false},
		{"a public key, not a seed", map[string]string{"OTP_NATS_NKEY_FILE": notSeed}, "OTP_NATS_NKEY_FILE", false},
		{"with a creds file", map[string]string{"OTP_NATS_NKEY_FILE": private, "OTP_NATS_CREDS": "/x.creds"}, "OTP_NATS_NKEY_FILE", false},
		{"with a user in the URL", map[string]string{"OTP_NATS_NKEY_FILE": private, "OTP_NATS_URL": "nats://svc:pw@127.0.0.1:4222"}, "OTP_NATS_URL", false},
		{"creds and a user in the URL", map[string]string{"OTP_NATS_CREDS": "/x.creds", "OTP_NATS_URL": "nats://a,nats://u:p@b:4222"}, "OTP_NATS_URL", false},
		{"a user in the URL alone", map[string]string{"OTP_NATS_URL": "nats://svc:pw@127.0.0.1:4222"}, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := platform.LoadCommon(func(k string) string { return tc.env[k] })
			if tc.want == "" {
				testenv.Must(t, err, "load")
				if c.NATSNkeyFile != tc.env["OTP_NATS_NKEY_FILE"] {
					t.Fatalf("NATSNkeyFile = %q", c.NATSNkeyFile)
				}
				return
			}
			var ce *platform.ConfigError
			var pe *platform.ProductionError
			switch {
			case tc.prod && errors.As(err, &pe) && pe.Setting == tc.want:
			case !tc.prod && errors.As(err, &ce) && ce.Var == tc.want:
			default:
				t.Fatalf("err = %v, want one naming %s", err, tc.want)
			}
			if strings.Contains(err.Error(), string(seed)) {
				t.Fatal("the error shows the seed")
			}
			t.Log(err)
		})
	}
}
