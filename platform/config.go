package platform

import (
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/otpflow/otpflow/events"
)

// Getenv reads one environment variable; os.Getenv in production, a map in tests.
type Getenv func(string) string

// ConfigError names the setting that stopped a service at start.
type ConfigError struct {
	Var string
	Msg string
}

func (e *ConfigError) Error() string { return e.Var + ": " + e.Msg }

// Common is the configuration every service reads.
type Common struct {
	NATSURL   string // OTP_NATS_URL
	NATSCreds string // OTP_NATS_CREDS
	// NATSNkeyFile (OTP_NATS_NKEY_FILE) names the file holding the nkey seed of the
	// service's NATS user, for servers with static nkey users (deploy/nats). At most one of
	// it, OTP_NATS_CREDS and a user in OTP_NATS_URL is set.
	NATSNkeyFile string
	NATSTLSCA    string // OTP_NATS_TLS_CA
	NATSTLSCert  string // OTP_NATS_TLS_CERT
	NATSTLSKey   string // OTP_NATS_TLS_KEY
	// NATSJSAPIPrefix (OTP_NATS_JS_API_PREFIX, default $JS.API) is the subject prefix of
	// the JetStream API. A process whose account holds no streams (deploy/nats: the
	// streams live in an account no process logs into) reaches them through service
	// imports mapped under this prefix.
	NATSJSAPIPrefix string
	// Replicas of the streams this service may create (OTP_NATS_REPLICAS, default 1).
	Replicas int
	// RequestsMaxAge is how long OTP_REQUESTS keeps a request (OTP_REQUESTS_MAX_AGE,
	// default 1h, from events.MinRequestsMaxAge to events.MaxRequestsMaxAge).
	RequestsMaxAge time.Duration
	// TenantStreams (OTP_TENANT_STREAMS: tenant names, separated by commas or spaces) each
	// get a request stream of their own, which OTP_REQUESTS sources
	// (events.StreamOptions.Tenants); provisioning applies it. TenantRequestsMaxBytes
	// (OTP_TENANT_REQUESTS_MAX_BYTES) bounds each of them.
	TenantStreams          []string
	TenantRequestsMaxBytes int64
	// DatabaseURL is OTP_DATABASE_URL; empty means the libpq environment and defaults.
	DatabaseURL string
	// DBMaxConns (OTP_DB_MAX_CONNS, default 16) bounds the service's PostgreSQL pool,
	// unless DatabaseURL sets pool_max_conns. pgx's own default (4 on a 2-core machine)
	// held the verifier to 4 verifications at a time and the dispatcher's 16 sends to 4
	// claims and records at a time.
	DBMaxConns int
	HTTPAddr   string // OTP_HTTP_ADDR; empty serves nothing
	LogLevel   string // OTP_LOG_LEVEL: debug, info, warn, error
	// ShutdownTimeout bounds the drain on SIGTERM (OTP_SHUTDOWN_TIMEOUT, default 25s).
	ShutdownTimeout time.Duration
	// ConnectTimeout bounds the wait for PostgreSQL and NATS at start
	// (OTP_CONNECT_TIMEOUT, default 30s).
	ConnectTimeout time.Duration
	// Env is OTP_ENV: EnvDevelopment (the default) or EnvProduction, which refuses at
	// start what belongs only on a laptop or in a sandbox (see production.go).
	Env string
	// AllowTestRecipients (OTP_ALLOW_TEST_RECIPIENTS) lets tenants keep fixed-code test
	// recipients in production.
	AllowTestRecipients bool
	// NATSPlaintextOK (OTP_NATS_PLAINTEXT_OK) accepts NATS without TLS to a remote
	// server in production, for meshes that encrypt below NATS.
	NATSPlaintextOK bool
	// Pprof (OTP_PPROF) serves Go's profiles under /debug/pprof/ on the ops endpoint, for
	// load runs (otpflow bench -profile). Production refuses it: the endpoint has no
	// authentication, and a profile shows the process's internals.
	Pprof bool
}

// The values of OTP_ENV.
const (
	EnvDevelopment = "development"
	EnvProduction  = "production"
)

// Production reports whether OTP_ENV=production.
func (c Common) Production() bool { return c.Env == EnvProduction }

// DefaultDBMaxConns is each service's PostgreSQL pool size when OTP_DB_MAX_CONNS is unset.
const DefaultDBMaxConns = 16

// DefaultNATSURL is used when OTP_NATS_URL is unset.
const DefaultNATSURL = "nats://127.0.0.1:4222"

// LoadCommon reads the shared settings.
func LoadCommon(getenv Getenv) (Common, error) {
	c := Common{
		NATSURL:         orDefault(getenv("OTP_NATS_URL"), DefaultNATSURL),
		NATSCreds:       getenv("OTP_NATS_CREDS"),
		NATSNkeyFile:    strings.TrimSpace(getenv("OTP_NATS_NKEY_FILE")),
		NATSTLSCA:       getenv("OTP_NATS_TLS_CA"),
		NATSTLSCert:     getenv("OTP_NATS_TLS_CERT"),
		NATSTLSKey:      getenv("OTP_NATS_TLS_KEY"),
		NATSJSAPIPrefix: orDefault(strings.TrimSpace(getenv("OTP_NATS_JS_API_PREFIX")), DefaultJSAPIPrefix),
		DatabaseURL:     getenv("OTP_DATABASE_URL"),
		HTTPAddr:        getenv("OTP_HTTP_ADDR"),
		LogLevel:        orDefault(getenv("OTP_LOG_LEVEL"), "info"),
		Env:             orDefault(strings.TrimSpace(getenv("OTP_ENV")), EnvDevelopment),
	}
	if c.Env != EnvDevelopment && c.Env != EnvProduction {
		return c, &ConfigError{"OTP_ENV", "must be development or production"}
	}
	var err error
	if c.AllowTestRecipients, err = BoolVar(getenv, "OTP_ALLOW_TEST_RECIPIENTS"); err != nil {
		return c, err
	}
	if c.NATSPlaintextOK, err = BoolVar(getenv, "OTP_NATS_PLAINTEXT_OK"); err != nil {
		return c, err
	}
	if c.Pprof, err = BoolVar(getenv, "OTP_PPROF"); err != nil {
		return c, err
	}
	if c.Pprof && c.Production() {
		return c, &ProductionError{"OTP_PPROF", "serves profiles on the ops endpoint, which has no authentication; profile a staging copy"}
	}
	if c.DBMaxConns, err = IntVar(getenv, "OTP_DB_MAX_CONNS", DefaultDBMaxConns, 1, 1000); err != nil {
		return c, err
	}
	if c.Replicas, err = IntVar(getenv, "OTP_NATS_REPLICAS", 1, 1, 5); err != nil {
		return c, err
	}
	if c.RequestsMaxAge, err = DurationVar(getenv, "OTP_REQUESTS_MAX_AGE", events.DefaultRequestsMaxAge); err != nil {
		return c, err
	}
	if c.RequestsMaxAge < events.MinRequestsMaxAge || c.RequestsMaxAge > events.MaxRequestsMaxAge {
		return c, &ConfigError{"OTP_REQUESTS_MAX_AGE", fmt.Sprintf("must be from %v (the longest code lifetime) to %v", events.MinRequestsMaxAge, events.MaxRequestsMaxAge)}
	}
	for _, t := range strings.FieldsFunc(getenv("OTP_TENANT_STREAMS"), func(r rune) bool { return r == ',' || unicode.IsSpace(r) }) {
		if !events.ValidTenant(t) {
			return c, &ConfigError{"OTP_TENANT_STREAMS", fmt.Sprintf("%q is not a tenant name (1-64 of [A-Za-z0-9_-])", t)}
		}
		c.TenantStreams = append(c.TenantStreams, t)
	}
	if s := strings.TrimSpace(getenv("OTP_TENANT_REQUESTS_MAX_BYTES")); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < events.RequestsMaxMsgSize {
			return c, &ConfigError{"OTP_TENANT_REQUESTS_MAX_BYTES", fmt.Sprintf("must be a number of bytes, at least %d (one request)", events.RequestsMaxMsgSize)}
		}
		c.TenantRequestsMaxBytes = n
	}
	if c.ShutdownTimeout, err = DurationVar(getenv, "OTP_SHUTDOWN_TIMEOUT", 25*time.Second); err != nil {
		return c, err
	}
	if c.ConnectTimeout, err = DurationVar(getenv, "OTP_CONNECT_TIMEOUT", 30*time.Second); err != nil {
		return c, err
	}
	if err := CheckJSAPIPrefix(c.NATSJSAPIPrefix); err != nil {
		return c, err
	}
	if (c.NATSTLSCert == "") != (c.NATSTLSKey == "") {
		return c, &ConfigError{"OTP_NATS_TLS_CERT", "OTP_NATS_TLS_CERT and OTP_NATS_TLS_KEY must be set together"}
	}
	if err := CheckNATSAuth(c); err != nil {
		return c, err
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return c, &ConfigError{"OTP_LOG_LEVEL", "must be debug, info, warn or error"}
	}
	return c, nil
}

// IntVar reads an integer variable within [min, max]; unset gives def.
func IntVar(getenv Getenv, name string, def, min, max int) (int, error) {
	s := strings.TrimSpace(getenv(name))
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < min || n > max {
		return 0, &ConfigError{name, fmt.Sprintf("must be an integer from %d to %d", min, max)}
	}
	return n, nil
}

// BoolVar reads true or false; unset is false.
func BoolVar(getenv Getenv, name string) (bool, error) {
	switch strings.TrimSpace(getenv(name)) {
	case "", "false":
		return false, nil
	case "true":
		return true, nil
	}
	return false, &ConfigError{name, "must be true or false"}
}

// DurationVar reads a Go duration ("30s"); unset gives def.
func DurationVar(getenv Getenv, name string, def time.Duration) (time.Duration, error) {
	s := strings.TrimSpace(getenv(name))
	if s == "" {
		return def, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, &ConfigError{name, "must be a positive duration such as 30s"}
	}
	return d, nil
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
