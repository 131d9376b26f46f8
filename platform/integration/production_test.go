package platform_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/policy"
	"github.com/otpflow/otpflow/platform/testenv"
)

// remote is a host name that is not this machine. No test sends anything to it.
const remote = "db.example.com"

// wantRefusal checks err is nil when setting is "", else a one-line production refusal
// naming setting.
func wantRefusal(t *testing.T, name string, err error, setting string) {
	t.Helper()
	if setting == "" {
		if err != nil {
			t.Errorf("%s: refused: %v", name, err)
		}
		return
	}
	var pe *platform.ProductionError
	if !errors.As(err, &pe) || pe.Setting != setting {
		t.Errorf("%s: err = %v, want a refusal naming %s", name, err, setting)
		return
	}
	if msg := err.Error(); strings.ContainsAny(msg, "\r\n") || !strings.HasPrefix(msg, "OTP_ENV=production: "+setting+" ") {
		t.Errorf("%s: message %q is not one line naming %s", name, msg, setting)
	}
}

func TestIsLocalHost(t *testing.T) {
	for _, tc := range []struct {
		host  string
		local bool
	}{
		{"127.0.0.1", true},
		{"127.3.2.1", true},
		{"::1", true},
		{"[::1]", true},
		{"::ffff:127.0.0.1", true},
		{"localhost", true},
		{"LOCALHOST", true},
		{"localhost.", true},
		{"/var/run/postgresql", true},
		{"/tmp", true},
		{"", false},
		{"0.0.0.0", false},
		{"10.0.0.7", false},
		{"128.0.0.1", false},
		{"::2", false},
		{"db.example.com", false},
		{"localhost.example.com", false},
		{"mylocalhost", false},
	} {
		if got := platform.IsLocalHost(tc.host); got != tc.local {
			t.Errorf("IsLocalHost(%q) = %v, want %v", tc.host, got, tc.local)
		}
	}
}

func TestCheckProviders(t *testing.T) {
	for _, tc := range []struct {
		name    string
		chain   []string
		refused string
	}{
		{"ses and smtp", []string{"ses", "smtp"}, ""},
		{"sandbox alone", []string{"sandbox"}, "OTP_PROVIDERS"},
		{"sandbox as the fallback", []string{"ses", "sandbox"}, "OTP_PROVIDERS"},
		{"null alone", []string{"null"}, "OTP_PROVIDERS"},
		{"null as the fallback", []string{"smtp", "null"}, "OTP_PROVIDERS"},
	} {
		wantRefusal(t, tc.name, platform.CheckProviders(tc.chain), tc.refused)
	}
}

func TestCheckSMTP(t *testing.T) {
	for _, tc := range []struct {
		name, host, tls, refused string
	}{
		{"starttls to a relay", "smtp.example.com", "starttls", ""},
		{"implicit TLS to a relay", "smtp.example.com", "implicit", ""},
		{"plaintext to a relay", "smtp.example.com", "none", "OTP_SMTP_URL"},
		{"plaintext to a relay by address", "192.0.2.25", "none", "OTP_SMTP_URL"},
		{"plaintext to a local sink", "127.0.0.1", "none", ""},
		{"plaintext to localhost", "localhost", "none", ""},
		{"plaintext to ::1", "::1", "none", ""},
	} {
		wantRefusal(t, tc.name, platform.CheckSMTP(tc.host, tc.tls), tc.refused)
	}
}

func TestCheckSESEndpoint(t *testing.T) {
	for _, tc := range []struct {
		name, endpoint, refused string
	}{
		{"the AWS endpoint", "", ""},
		{"https VPC endpoint", "https://vpce-1.email.eu-west-1.vpce.amazonaws.com", ""},
		{"http to a remote host", "http://ses.example.com", "OTP_SES_ENDPOINT"},
		{"HTTP with a port", "HTTP://ses.example.com:8080/", "OTP_SES_ENDPOINT"},
		{"http to a remote address", "http://192.0.2.4:4566", "OTP_SES_ENDPOINT"},
		{"http to a local emulator", "http://127.0.0.1:4566", ""},
		{"http to localhost", "http://localhost:4566", ""},
		{"http to ::1", "http://[::1]:4566", ""},
		{"not a URL", "http://[bad", "OTP_SES_ENDPOINT"},
	} {
		wantRefusal(t, tc.name, platform.CheckSESEndpoint(tc.endpoint), tc.refused)
	}
}

func TestCheckPostgresTLS(t *testing.T) {
	// The libpq environment applies to every case; clear what the caller may have set.
	for _, k := range []string{"PGHOST", "PGSSLMODE", "PGSSLROOTCERT", "PGSERVICE", "PGSERVICEFILE"} {
		t.Setenv(k, "")
	}
	for _, tc := range []struct {
		name    string
		url     string
		env     map[string]string
		refused string
	}{
		{"remote, sslmode unset (prefer)", "postgres://app@" + remote + "/otp", nil, "OTP_DATABASE_URL"},
		{"remote, disable", "postgres://app@" + remote + "/otp?sslmode=disable", nil, "OTP_DATABASE_URL"},
		{"remote, allow", "postgres://app@" + remote + "/otp?sslmode=allow", nil, "OTP_DATABASE_URL"},
		{"remote, prefer", "postgres://app@" + remote + "/otp?sslmode=prefer", nil, "OTP_DATABASE_URL"},
		{"remote, require", "postgres://app@" + remote + "/otp?sslmode=require", nil, ""},
		{"remote, verify-full", "postgres://app@" + remote + "/otp?sslmode=verify-full", nil, ""},
		{"remote DSN, disable", "host=" + remote + " user=app sslmode=disable", nil, "OTP_DATABASE_URL"},
		{"remote DSN, require", "host=" + remote + " user=app sslmode=require", nil, ""},
		{"remote by address, prefer", "postgres://app@10.1.2.3/otp", nil, "OTP_DATABASE_URL"},
		{"loopback, disable", "postgres://app@127.0.0.1:5432/otp?sslmode=disable", nil, ""},
		{"localhost, prefer", "postgres://app@localhost/otp", nil, ""},
		{"::1, disable", "postgres://app@[::1]/otp?sslmode=disable", nil, ""},
		{"unix socket, disable", "host=/var/run/postgresql user=app sslmode=disable", nil, ""},
		{"local then remote, disable", "host=127.0.0.1," + remote + " user=app sslmode=disable", nil, "OTP_DATABASE_URL"},
		{"two remotes, require", "host=" + remote + ",db2.example.com user=app sslmode=require", nil, ""},
		{"URL without sslmode, PGSSLMODE=require", "postgres://app@" + remote + "/otp", map[string]string{"PGSSLMODE": "require"}, ""},
		{"URL without sslmode, PGSSLMODE=disable", "postgres://app@" + remote + "/otp", map[string]string{"PGSSLMODE": "disable"}, "OTP_DATABASE_URL"},
		{"unset, PGHOST remote, PGSSLMODE=disable", "", map[string]string{"PGHOST": remote, "PGSSLMODE": "disable"}, "PGSSLMODE"},
		{"unset, PGHOST remote, PGSSLMODE unset", "", map[string]string{"PGHOST": remote}, "PGSSLMODE"},
		{"unset, PGHOST remote, PGSSLMODE=require", "", map[string]string{"PGHOST": remote, "PGSSLMODE": "require"}, ""},
		{"unset, PGHOST a socket directory", "", map[string]string{"PGHOST": "/var/run/postgresql", "PGSSLMODE": "disable"}, ""},
		{"unset, libpq defaults", "", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			wantRefusal(t, tc.name, platform.CheckPostgresTLS(tc.url), tc.refused)
		})
	}
	var ce *platform.ConfigError
	if err := platform.CheckPostgresTLS("postgres://app@" + remote + ":port/otp"); !errors.As(err, &ce) || ce.Var != "OTP_DATABASE_URL" {
		t.Errorf("malformed URL: %v", err)
	}
}

func TestCheckNATSTLSDecision(t *testing.T) {
	done := &tls.ConnectionState{HandshakeComplete: true}
	for _, tc := range []struct {
		name        string
		host        string
		state       *tls.ConnectionState
		plaintextOK bool
		refused     string
	}{
		{"TLS to a remote server", "nats.example.com", done, false, ""},
		{"plaintext to a remote server", "nats.example.com", nil, false, "OTP_NATS_URL"},
		{"a handshake that did not complete", "10.0.0.4", &tls.ConnectionState{}, false, "OTP_NATS_URL"},
		{"plaintext to a remote server, OTP_NATS_PLAINTEXT_OK", "nats.example.com", nil, true, ""},
		{"plaintext to loopback", "127.0.0.1", nil, false, ""},
		{"plaintext to ::1", "::1", nil, false, ""},
	} {
		wantRefusal(t, tc.name, platform.CheckNATSTLS(tc.host, tc.state, tc.plaintextOK), tc.refused)
	}
}

// TestCheckNATSTLSOnRealConnections connects to a TLS-only server and a plaintext one (both
// on 127.0.0.1) and judges each connection's real state as if the server were remote: the
// TLS session passes, the plaintext one is refused unless OTP_NATS_PLAINTEXT_OK.
func TestCheckNATSTLSOnRealConnections(t *testing.T) {
	log := testenv.Logger(io.Discard)
	caFile, tlsConf := throwawayTLS(t)
	secure, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, TLSConfig: tlsConf, TLSTimeout: 5, NoLog: true, NoSigs: true})
	testenv.Must(t, err, "nats server")
	go secure.Start()
	t.Cleanup(func() { secure.Shutdown(); secure.WaitForShutdown() })
	if !secure.ReadyForConnections(10 * time.Second) {
		t.Fatal("TLS nats server not ready")
	}
	// A client without TLS material is turned away: the server requires TLS.
	if nc, err := platform.ConnectNATS(platform.Common{NATSURL: secure.ClientURL()}, "test", log); err == nil {
		nc.Close()
		t.Fatal("a client that does not trust the CA connected to the TLS-only server")
	}

	nc, err := platform.ConnectNATS(platform.Common{NATSURL: secure.ClientURL(), NATSTLSCA: caFile}, "test", log)
	testenv.Must(t, err, "connect with TLS")
	defer nc.Close()
	host, state := platform.NATSPeer(nc)
	if host != "127.0.0.1" || state == nil || !state.HandshakeComplete || state.Version < tls.VersionTLS12 {
		t.Fatalf("TLS connection: host %q, state %+v", host, state)
	}
	wantRefusal(t, "real TLS session, judged remote", platform.CheckNATSTLS("nats.example.com", state, false), "")
	wantRefusal(t, "real TLS session, its own host", platform.CheckNATSTLS(host, state, false), "")

	plain, err := platform.ConnectNATS(platform.Common{NATSURL: testenv.NATS(t).ClientURL()}, "test", log)
	testenv.Must(t, err, "connect plaintext")
	defer plain.Close()
	host, state = platform.NATSPeer(plain)
	if host != "127.0.0.1" || state != nil {
		t.Fatalf("plaintext connection: host %q, state %+v", host, state)
	}
	wantRefusal(t, "real plaintext session, judged remote", platform.CheckNATSTLS("nats.example.com", state, false), "OTP_NATS_URL")
	wantRefusal(t, "real plaintext session, judged remote, OTP_NATS_PLAINTEXT_OK", platform.CheckNATSTLS("nats.example.com", state, true), "")
	wantRefusal(t, "real plaintext session, its own host", platform.CheckNATSTLS(host, state, false), "")
}

// TestOpenInProductionWithLocalNeighbours: loopback PostgreSQL without TLS and loopback
// NATS, plaintext or TLS, pass production's checks.
func TestOpenInProductionWithLocalNeighbours(t *testing.T) {
	log := testenv.Logger(io.Discard)
	caFile, tlsConf := throwawayTLS(t)
	secure, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, TLSConfig: tlsConf, TLSTimeout: 5, NoLog: true, NoSigs: true})
	testenv.Must(t, err, "nats server")
	go secure.Start()
	t.Cleanup(func() { secure.Shutdown(); secure.WaitForShutdown() })
	if !secure.ReadyForConnections(10 * time.Second) {
		t.Fatal("TLS nats server not ready")
	}
	db := testenv.Database(t)
	for name, c := range map[string]platform.Common{
		"plaintext NATS": {NATSURL: testenv.NATS(t).ClientURL()},
		"TLS NATS":       {NATSURL: secure.ClientURL(), NATSTLSCA: caFile},
	} {
		c.Env, c.DatabaseURL, c.ConnectTimeout = platform.EnvProduction, db, 10*time.Second
		d, err := platform.Open(context.Background(), c, "test", log)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		d.Close()
	}
}

func TestCheckTestRecipients(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		allowed    bool
		refused    string
		mentions   string
	}{
		{"no test recipients", "tenants:\n  acme:\n    max_attempts: 3\n", false, "", ""},
		{"in a tenant", "tenants:\n  acme: {}\n  beta:\n    test_recipients:\n      qa@beta.example: \"123456\"\n", false, "OTP_TENANTS_FILE", "tenant beta"},
		{"in the defaults", "defaults:\n  test_recipients:\n    qa@example.com: \"123456\"\n", false, "OTP_TENANTS_FILE", "the defaults"},
		{"in a tenant, allowed", "tenants:\n  beta:\n    test_recipients:\n      qa@beta.example: \"123456\"\n", true, "", ""},
	} {
		set, err := policy.Parse([]byte(tc.file))
		testenv.Must(t, err, "%s: parse", tc.name)
		err = platform.CheckTestRecipients(set, tc.allowed)
		wantRefusal(t, tc.name, err, tc.refused)
		if err != nil && !(strings.Contains(err.Error(), "test_recipients") && strings.Contains(err.Error(), "OTP_ALLOW_TEST_RECIPIENTS") && strings.Contains(err.Error(), tc.mentions)) {
			t.Errorf("%s: %q names neither test_recipients, OTP_ALLOW_TEST_RECIPIENTS and %s", tc.name, err, tc.mentions)
		}
	}
}

func TestCheckGuessOdds(t *testing.T) {
	for _, tc := range []struct {
		name, file, refused, mentions string
	}{
		{"the built-in defaults: 5 × 3 in 10^6", "", "", ""},
		{"4 digits: 5 × 3 in 10^4", "tenants:\n  acme:\n    code_length: 4\n", "OTP_TENANTS_FILE", "tenant acme"},
		{"4 digits in the defaults", "defaults:\n  code_length: 4\n", "OTP_TENANTS_FILE", "the defaults"},
		{"exactly 1 in 10,000 passes", "tenants:\n  acme:\n    code_length: 4\n    max_attempts: 1\n    recent_codes: 1\n", "", ""},
		{"just above 1 in 10,000", "tenants:\n  acme:\n    code_length: 4\n    max_attempts: 2\n    recent_codes: 1\n", "OTP_TENANTS_FILE", "tenant acme"},
		{"many live codes: 20 × 20 in 10^6", "tenants:\n  acme:\n    max_attempts: 20\n    max_sends: 20\n    recent_codes: 20\n", "OTP_TENANTS_FILE", "tenant acme"},
		{"36 symbols, 4 long: 5 × 3 in 36^4", "tenants:\n  acme:\n    code_length: 4\n    alphabet: ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n", "", ""},
		{"2 symbols, 12 long: 5 × 3 in 2^12", "tenants:\n  acme:\n    code_length: 12\n    alphabet: \"01\"\n", "OTP_TENANTS_FILE", "tenant acme"},
	} {
		set, err := policy.Parse([]byte(tc.file))
		testenv.Must(t, err, "%s: parse", tc.name)
		err = platform.CheckGuessOdds(set)
		wantRefusal(t, tc.name, err, tc.refused)
		if err != nil && !(strings.Contains(err.Error(), "max_attempts") && strings.Contains(err.Error(), "recent_codes") && strings.Contains(err.Error(), tc.mentions)) {
			t.Errorf("%s: %q does not name max_attempts, recent_codes and %s", tc.name, err, tc.mentions)
		}
	}
}

func TestCheckPoliciesOnlyInProduction(t *testing.T) {
	set, err := policy.Parse([]byte("tenants:\n  acme:\n    code_length: 4\n    test_recipients:\n      qa@acme.example: \"1234\"\n"))
	testenv.Must(t, err, "parse")
	dev := platform.Common{Env: platform.EnvDevelopment}
	if err := platform.CheckPolicies(dev, set); err != nil {
		t.Errorf("development: %v", err)
	}
	prod := platform.Common{Env: platform.EnvProduction}
	if err := platform.CheckPolicies(prod, set); err == nil || !strings.Contains(err.Error(), "test_recipients") {
		t.Errorf("production: %v, want the test recipients refused first", err)
	}
	prod.AllowTestRecipients = true
	if err := platform.CheckPolicies(prod, set); err == nil || !strings.Contains(err.Error(), "max_attempts") {
		t.Errorf("production with test recipients allowed: %v, want the odds refused", err)
	}
}

// throwawayTLS makes a CA and a certificate for 127.0.0.1 signed by it; it returns the
// CA's PEM file and the server's TLS configuration.
func throwawayTLS(t *testing.T) (caFile string, conf *tls.Config) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	testenv.Must(t, err, "CA key")
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "otpflow test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	testenv.Must(t, err, "CA certificate")
	ca, err = x509.ParseCertificate(caDER)
	testenv.Must(t, err, "parse CA")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	testenv.Must(t, err, "server key")
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	testenv.Must(t, err, "server certificate")
	caFile = filepath.Join(t.TempDir(), "ca.pem")
	testenv.Must(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600), "write CA")
	return caFile, &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER}, PrivateKey: key}}}
}
