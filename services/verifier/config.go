package verifier

import (
	"time"

	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/platform/policy"
	"go.opentelemetry.io/otel/trace"
)

// Config is the verifier's configuration. Zero values get the defaults named below.
type Config struct {
	Pepper *keys.Pepper
	// Subjects hashes recipients and client IPs for the failure cap and the verify
	// limits (OTP_SUBJECT_KEY).
	Subjects *keys.Subjects
	// Policies per tenant (OTP_TENANTS_FILE): recent codes that verify, the per-recipient
	// failure cap, the recipient_failures risk rule.
	Policies *policy.Set
	// FenceWait bounds how long a verify for an unknown request waits for the projection
	// to catch up with the stream (read-your-writes, fence.go); default 1s.
	FenceWait time.Duration
	// MaxFenceWaits bounds the verifies of one process that wait for the projection at
	// once; a verify for an unknown request over it answers from the projection as it is
	// (not_found), so a flood of unknown request ids cannot hold every worker. Default 16.
	MaxFenceWaits int
	// VerifyIPPerMinute caps verify calls per tenant and client IP (context.ip; IPv6 by
	// its /64) across replicas (OTP_VERIFY_IP_PER_MINUTE). 0 means the default 60; a
	// negative value turns the limit off.
	VerifyIPPerMinute int
	// VerifyTenantPerMinute caps verify calls per tenant across replicas
	// (OTP_VERIFY_TENANT_PER_MINUTE). 0 (the default) or negative: off.
	VerifyTenantPerMinute int
	// Retention keeps expired, used and superseded challenges this long (OTP_RETENTION, default 24h).
	Retention time.Duration
	// Concurrency bounds verify requests handled at once per process; default 64.
	Concurrency int
	// StatusConcurrency bounds status requests handled at once per process, apart from
	// verify's; a status request over it is answered busy at once. Default a quarter of
	// Concurrency, at least 4, and at most a quarter of the database pool's connections
	// (at least 1).
	StatusConcurrency int
	// StatusTenantPerMinute paces each tenant's status requests per process, a second's
	// worth at once (OTP_STATUS_TENANT_PER_MINUTE); over it a request is answered
	// rate_limited. 0 means the default 6000; a negative value turns it off.
	StatusTenantPerMinute int
	// VerifyTransactions bounds the verify transactions in flight at once per process
	// (OTP_VERIFY_TRANSACTIONS, default 4), each committing a group of up to
	// VerifyGroupSize verifies (OTP_VERIFY_GROUP_SIZE, default 64; 1 turns grouping off).
	VerifyTransactions int
	VerifyGroupSize    int
	BatchSize          int
	// StatusLinger is how long a batch of the status projection that is not full waits
	// for more events (platform.ConsumeConfig.Linger): default DefaultStatusLinger;
	// negative, none. The challenge projection never lingers: a verify that comes before
	// its code is projected waits for it (verify.go, the fence).
	StatusLinger time.Duration
	Streams      events.StreamOptions
	// DLQKey seals the events the projection dead-letters (OTP_DLQ_KEY); required.
	DLQKey *keys.Sealer
	// lockTimeout bounds a verify group's wait for a row lock (tests lengthen it);
	// default 2s.
	lockTimeout time.Duration
	// relayAge is the age of an outbox entry the relay publishes (tests lengthen it);
	// default 5s.
	relayAge time.Duration
	// orphanDelay caps the delay before feedback about a challenge the status projection
	// does not hold is delivered again (statusOrphanDeliveries; tests shorten it); default
	// a minute (defaultOrphanDelay).
	orphanDelay time.Duration
	// beforeStatus, when set, runs in each status call that holds a slot, before its
	// read (tests hold the slots with it).
	beforeStatus func()
	// Tracer gets a "verify" span per request, continuing the app's traceparent and
	// linked to the issuance; nil records nothing.
	Tracer trace.Tracer
}

// DefaultVerifyIPPerMinute is the per-IP verify limit when none is configured.
const DefaultVerifyIPPerMinute = 60

// DefaultStatusTenantPerMinute is the per-tenant status pace of a process when none is
// configured: 100 a second.
const DefaultStatusTenantPerMinute = 6000

// DefaultStatusLinger is Config.StatusLinger's default: at 1,000 events a second, batches
// of about 20 instead of a handful (docs/performance.md), and a state answered at most
// that much later.
const DefaultStatusLinger = 20 * time.Millisecond

// DefaultBatchSize is Config.BatchSize's default: the messages each projection handles
// in one transaction.
const DefaultBatchSize = 100

// LoadConfig reads the verifier's settings from the environment. With OTP_ENV=production
// it refuses a tenants file that production refuses (platform.CheckPolicies).
func LoadConfig(getenv platform.Getenv, common platform.Common) (Config, error) {
	pepper, err := keys.ParsePepper(getenv("OTP_CODE_PEPPER"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_CODE_PEPPER", Msg: err.Error()}
	}
	subjects, err := keys.ParseSubjects(getenv("OTP_SUBJECT_KEY"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_SUBJECT_KEY", Msg: err.Error()}
	}
	dlq, err := platform.LoadDLQKey(getenv)
	if err != nil {
		return Config{}, err
	}
	retention, err := platform.DurationVar(getenv, "OTP_RETENTION", platform.Retention)
	if err != nil {
		return Config{}, err
	}
	policies, err := policy.Load(getenv("OTP_TENANTS_FILE"))
	if err != nil {
		return Config{}, &platform.ConfigError{Var: "OTP_TENANTS_FILE", Msg: err.Error()}
	}
	// In the environment, as in the tenant policy file, 0 turns a limit off.
	ipPerMinute, err := platform.IntVar(getenv, "OTP_VERIFY_IP_PER_MINUTE", DefaultVerifyIPPerMinute, 0, 1_000_000)
	if err != nil {
		return Config{}, err
	}
	if ipPerMinute == 0 {
		ipPerMinute = -1
	}
	tenantPerMinute, err := platform.IntVar(getenv, "OTP_VERIFY_TENANT_PER_MINUTE", 0, 0, 100_000_000)
	if err != nil {
		return Config{}, err
	}
	statusPerMinute, err := platform.IntVar(getenv, "OTP_STATUS_TENANT_PER_MINUTE", DefaultStatusTenantPerMinute, 0, 100_000_000)
	if err != nil {
		return Config{}, err
	}
	if statusPerMinute == 0 {
		statusPerMinute = -1
	}
	transactions, err := platform.IntVar(getenv, "OTP_VERIFY_TRANSACTIONS", defaultVerifyTransactions, 1, 64)
	if err != nil {
		return Config{}, err
	}
	groupSize, err := platform.IntVar(getenv, "OTP_VERIFY_GROUP_SIZE", defaultVerifyGroupSize, 1, 1000)
	if err != nil {
		return Config{}, err
	}
	// The production rules of the tenants file (test recipients, a guesser's odds).
	if err := platform.CheckPolicies(common, policies); err != nil {
		return Config{}, err
	}
	return Config{Pepper: pepper, Subjects: subjects, Policies: policies, Retention: retention,
		VerifyIPPerMinute: ipPerMinute, VerifyTenantPerMinute: tenantPerMinute, StatusTenantPerMinute: statusPerMinute,
		VerifyTransactions: transactions, VerifyGroupSize: groupSize,
		Streams: common.Streams(), DLQKey: dlq}, nil
}
