package platform

import (
	"crypto/tls"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
)

// OTP_ENV=production refuses at start whatever belongs only on a laptop or in a sandbox.
// Each rule is one function below; the services call them where they read the setting
// (LoadConfig, Open), so a refusal comes before any connection to the host it is about.

// ProductionError is a setting that OTP_ENV=production refuses. Its message is one line
// that names the setting.
type ProductionError struct {
	Setting string // the variable or policy setting, e.g. OTP_PROVIDERS
	Reason  string
}

func (e *ProductionError) Error() string {
	return "OTP_ENV=production: " + e.Setting + " " + e.Reason
}

// MaxGuessOdds is the highest chance a production policy may give a guesser to win one
// challenge: 1 in 10,000.
const MaxGuessOdds = 10000

// IsLocalHost reports whether host is this machine by its name alone: a unix socket
// path, "localhost", or a loopback address (127.0.0.0/8, ::1). Nothing is resolved, so
// a name that merely points at a loopback address counts as remote.
func IsLocalHost(host string) bool {
	if strings.HasPrefix(host, "/") {
		return true
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if zone := strings.IndexByte(host, '%'); zone >= 0 {
		host = host[:zone]
	}
	if strings.EqualFold(strings.TrimSuffix(host, "."), "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// CheckProviders refuses the sandbox provider in the chain of OTP_PROVIDERS.
func CheckProviders(providers []string) error {
	if slices.Contains(providers, "sandbox") {
		return &ProductionError{"OTP_PROVIDERS", "contains sandbox, which writes mail to a local folder"}
	}
	if slices.Contains(providers, "null") {
		return &ProductionError{"OTP_PROVIDERS", "contains null, which mails nothing and hands every code in clear text to a load generator"}
	}
	return nil
}

// CheckSMTP refuses OTP_SMTP_URL with tls=none (tlsMode "none") to a remote host: the
// codes and the relay password would cross the network in clear text.
func CheckSMTP(host, tlsMode string) error {
	if tlsMode == "none" && !IsLocalHost(host) {
		return &ProductionError{"OTP_SMTP_URL", fmt.Sprintf("uses tls=none to %s, which sends codes and the password in clear text; use tls=starttls or tls=implicit", host)}
	}
	return nil
}

// CheckSESEndpoint refuses an OTP_SES_ENDPOINT that is http:// to a remote host. Empty
// (the AWS endpoint, https) passes.
func CheckSESEndpoint(endpoint string) error {
	return CheckSESEndpointFrom("OTP_SES_ENDPOINT", endpoint)
}

// CheckSESEndpointFrom is CheckSESEndpoint for an endpoint that came from setting: the
// AWS SDK also takes one from AWS_ENDPOINT_URL_SESV2, AWS_ENDPOINT_URL or the shared
// config file, so the dispatcher checks the endpoint its client resolved as well.
func CheckSESEndpointFrom(setting, endpoint string) error {
	if endpoint == "" {
		return nil
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		return &ProductionError{setting, "is not a URL"}
	}
	if !strings.EqualFold(u.Scheme, "https") && !IsLocalHost(u.Hostname()) {
		return &ProductionError{setting, fmt.Sprintf("is %s:// to %s, which sends codes and request signatures in clear text; use https://", u.Scheme, u.Hostname())}
	}
	return nil
}

// CheckPostgresTLS refuses a PostgreSQL connection that may go to a remote host without
// TLS: sslmode disable, allow or prefer (the default when unset). It reads the settings
// as the pool does (OTP_DATABASE_URL, else the libpq environment PGHOST, PGSSLMODE, ...):
// pgx expresses allow and prefer as a fallback without TLS, so every host pgx may try
// must be local or have TLS.
func CheckPostgresTLS(databaseURL string) error {
	cfg, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		return &ConfigError{"OTP_DATABASE_URL", "not a PostgreSQL URL or DSN"}
	}
	setting, where := "OTP_DATABASE_URL", "(or PGSSLMODE)"
	if databaseURL == "" {
		setting, where = "PGSSLMODE", "(OTP_DATABASE_URL is unset, so PGHOST and PGSSLMODE apply)"
	}
	cc := cfg.ConnConfig
	if cc.TLSConfig == nil && !IsLocalHost(cc.Host) {
		return postgresPlaintext(setting, where, cc.Host)
	}
	for _, f := range cc.Fallbacks {
		if f.TLSConfig == nil && !IsLocalHost(f.Host) {
			return postgresPlaintext(setting, where, f.Host)
		}
	}
	return nil
}

func postgresPlaintext(setting, where, host string) error {
	return &ProductionError{setting, fmt.Sprintf("%s lets the connection to PostgreSQL at %s go unencrypted (sslmode disable, allow or prefer; unset means prefer); use sslmode=require or verify-full", where, host)}
}

// NATSPeer is what CheckNATSTLS judges a connection by: the host of the server nc is
// connected to (its address, not the name it was dialled by) and the state of its TLS
// session, nil when the connection is plaintext.
func NATSPeer(nc *nats.Conn) (host string, state *tls.ConnectionState) {
	host = nc.ConnectedAddr()
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	if st, err := nc.TLSConnectionState(); err == nil && st.HandshakeComplete {
		state = &st
	}
	return host, state
}

// CheckNATSTLS refuses a NATS connection to a remote host without TLS, unless plaintextOK
// (OTP_NATS_PLAINTEXT_OK=true: a mesh encrypts below NATS). It is judged after connecting
// because nats.go upgrades to TLS when the server requires it, whatever the URL says; in
// production ConnectNATS requires TLS on every reconnect to a remote server list and
// judges each reconnect again.
func CheckNATSTLS(host string, state *tls.ConnectionState, plaintextOK bool) error {
	return checkNATSTLS(host, state, plaintextOK, IsLocalHost)
}

func checkNATSTLS(host string, state *tls.ConnectionState, plaintextOK bool, local func(string) bool) error {
	if state != nil && state.HandshakeComplete || plaintextOK || local(host) {
		return nil
	}
	return &ProductionError{"OTP_NATS_URL", fmt.Sprintf("connects to %s without TLS; require TLS on the server (with OTP_NATS_TLS_CA) or set OTP_NATS_PLAINTEXT_OK=true if the network encrypts below NATS", host)}
}

// CheckPolicies applies the policy rules of production to the tenants file: test
// recipients and the odds of a guesser. It does nothing in development.
func CheckPolicies(c Common, set *policy.Set) error {
	if !c.Production() {
		return nil
	}
	if err := CheckTestRecipients(set, c.AllowTestRecipients); err != nil {
		return err
	}
	return CheckGuessOdds(set)
}

// CheckTestRecipients refuses fixed-code test recipients (policy test_recipients, in the
// defaults or any tenant) unless allowed (OTP_ALLOW_TEST_RECIPIENTS=true).
func CheckTestRecipients(set *policy.Set, allowed bool) error {
	if allowed {
		return nil
	}
	for _, name := range policyNames(set) {
		if p := set.For(name); len(p.TestRecipients) > 0 {
			return &ProductionError{"OTP_TENANTS_FILE", fmt.Sprintf("gives %s test_recipients, which get a fixed code; remove them or set OTP_ALLOW_TEST_RECIPIENTS=true", policyLabel(name))}
		}
	}
	return nil
}

// CheckGuessOdds refuses a policy (the defaults or any tenant's) under which a guesser
// wins one challenge with a chance above 1 in MaxGuessOdds: every attempt is compared
// with each live code, so the chance is max_attempts × recent_codes / alphabet^code_length.
func CheckGuessOdds(set *policy.Set) error {
	for _, name := range policyNames(set) {
		p := set.For(name)
		codes := new(big.Int).Exp(big.NewInt(int64(utf8.RuneCountInString(p.Alphabet))), big.NewInt(int64(p.CodeLength)), nil)
		tries := big.NewInt(int64(p.MaxAttempts) * int64(p.RecentCodes))
		if new(big.Int).Mul(tries, big.NewInt(MaxGuessOdds)).Cmp(codes) > 0 {
			oneIn := new(big.Int).Div(codes, tries)
			return &ProductionError{"OTP_TENANTS_FILE", fmt.Sprintf("gives %s max_attempts %d × recent_codes %d against %d^%d codes (alphabet^code_length): a guesser wins 1 challenge in %s, more often than 1 in %d; raise code_length or lower max_attempts or recent_codes",
				policyLabel(name), p.MaxAttempts, p.RecentCodes, utf8.RuneCountInString(p.Alphabet), p.CodeLength, oneIn, MaxGuessOdds)}
		}
	}
	return nil
}

// policyNames lists the policies of set: "" for the defaults (no tenant has that name,
// so For("") gives the defaults), then the tenants in order.
func policyNames(set *policy.Set) []string {
	tenants := set.Tenants()
	slices.Sort(tenants)
	return append([]string{""}, tenants...)
}

func policyLabel(name string) string {
	if name == "" {
		return "the defaults"
	}
	return "tenant " + name
}

// CheckDLQKey refuses an OTP_DLQ_KEY that shares a key with OTP_SEAL_KEY: whoever opens
// dead letters (a redrive, an operator) would also open every dispatch job, code
// included. It is checked where both keys are read (issuer, dispatcher).
func CheckDLQKey(dlq, seal *keys.Sealer) error {
	if dlq.SharesKey(seal) {
		return &ProductionError{Setting: "OTP_DLQ_KEY", Reason: "shares a key with OTP_SEAL_KEY; give dead letters a key of their own"}
	}
	return nil
}
