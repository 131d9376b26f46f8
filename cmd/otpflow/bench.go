package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	neturl "net/url"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
)

// benchOptions are otpflow bench's flags.
type benchOptions struct {
	requests      int
	rate          int
	sink          string // null, maildir, or an smtp:// URL
	verify        bool
	dispatchers   int
	concurrency   int
	json          bool
	bin           string
	dir           string
	tenant        string
	warmup        int
	settle        time.Duration
	sendDelay     time.Duration
	verifyClients int
	verifyRate    int
	profile       string
	profileFor    int // seconds
	natsOnly      bool
	adminURL      string
}

// benchResult is what -json prints: one object.
type benchResult struct {
	Requests    int    `json:"requests"`
	Rate        int    `json:"rate"`
	Sink        string `json:"sink"`
	Dispatchers int    `json:"dispatchers"`
	Concurrency int    `json:"dispatch_concurrency"`
	// Accepted is how many requests OTP_REQUESTS stored (the app saw the ack).
	Accepted  int `json:"accepted"`
	Issued    int `json:"issued"`
	Delivered int `json:"delivered"`
	Rejected  int `json:"rejected"`
	// Failed counts otp.delivery_failed and otp.dispatch_expired.
	Failed int `json:"failed"`
	// Lost: accepted with no outcome by the end, or reported delivered and never in the sink.
	Lost int `json:"lost"`
	// Duplicates: a code mailed, or reported delivered, more than once.
	Duplicates int `json:"duplicates"`
	// DurationS runs from the first request stored to the last provider answer.
	DurationS     float64 `json:"duration_s"`
	PublishPerSec float64 `json:"publish_per_sec"`
	IssuedPerSec  float64 `json:"issued_per_sec"`
	OTPsPerSec    float64 `json:"otps_per_sec"`
	// LatencyMS is request stored on OTP_REQUESTS (its stream timestamp) → the provider's
	// success answer, per delivered code.
	LatencyMS benchLatency `json:"latency_ms"`
	// LatencyEnd says where latency_ms ends: provider_answer (the null sink's clock as
	// it accepted the mail) or delivered_event (otp.delivered's delivered_at, stamped
	// once the dispatcher recorded the send: the other sinks).
	LatencyEnd string `json:"latency_end"`
	// IssueLatencyMS is its first part: request stored → the issuer's clock as it issued
	// the code (otp.issued's issued_at); the rest is dispatch and the provider.
	IssueLatencyMS  benchLatency          `json:"issue_latency_ms"`
	Verified        int                   `json:"verified"`
	VerifyStatuses  map[string]int        `json:"verify_statuses,omitempty"`
	VerifyPerSec    float64               `json:"verify_per_sec"`
	VerifyLatencyMS benchLatency          `json:"verify_latency_ms"`
	Services        map[string]benchUsage `json:"services"`
	// Bench is this process: the load generator, the sink and, unless OTP_NATS_URL is
	// set, the embedded NATS server.
	Bench benchUsage `json:"bench"`
	// DatabaseCPU is the CPU seconds PostgreSQL spent in the load, by the role of each
	// backend ("other": the server's own processes, and backends gone by the end), when
	// the server runs on this machine.
	DatabaseCPU map[string]float64 `json:"database_cpu_s,omitempty"`
	Profiles    string             `json:"profiles,omitempty"`
}

type benchLatency struct {
	P50 float64 `json:"p50"`
	P95 float64 `json:"p95"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

type benchUsage struct {
	// CPUSeconds is user and system CPU from the start of the measured load to its end.
	CPUSeconds float64 `json:"cpu_s"`
	PeakRSSMB  float64 `json:"peak_rss_mb"`
}

func benchFlags(fs *flag.FlagSet) *benchOptions {
	o := &benchOptions{}
	fs.IntVar(&o.requests, "requests", 10000, "otp.requested events to publish")
	fs.IntVar(&o.rate, "rate", 0, "requests per second; 0: as fast as the stream takes them")
	fs.StringVar(&o.sink, "sink", "null", "where mail goes: null (accepted at once, codes handed to the bench), maildir, or smtp://host:port[?tls=none] (a relay such as Mailpit)")
	fs.BoolVar(&o.verify, "verify", false, "then verify every delivered code on otp.verify (null and maildir sinks)")
	fs.IntVar(&o.dispatchers, "dispatchers", 1, "dispatcher processes")
	fs.IntVar(&o.concurrency, "dispatch-concurrency", 0, "OTP_DISPATCH_CONCURRENCY of each dispatcher; 0: the environment's, else the default")
	fs.BoolVar(&o.json, "json", false, "print the result as one JSON object")
	fs.StringVar(&o.bin, "bin", "", "folder of the service binaries (default: this executable's folder)")
	fs.StringVar(&o.dir, "dir", "", "state directory: NATS store, logs, mailbox (default: a new temporary one, removed after)")
	fs.StringVar(&o.tenant, "tenant", "bench", "tenant of the requests")
	fs.IntVar(&o.warmup, "warmup", 2000, "requests sent and delivered before the measured ones (then the database is analyzed)")
	fs.DurationVar(&o.settle, "settle", 30*time.Second, "give up on the rest when no request reaches an outcome for this long")
	fs.DurationVar(&o.sendDelay, "send-delay", 0, "null sink: how long each send takes (a slow provider)")
	fs.IntVar(&o.verifyClients, "verify-clients", 32, "concurrent verify clients")
	fs.IntVar(&o.verifyRate, "verify-rate", 0, "verifies per second; 0: as fast as the clients go")
	fs.StringVar(&o.profile, "profile", "", "folder for pprof CPU and allocation profiles of each service, taken under load, and this process's CPU profile (bench.cpu.pprof; nats-only.cpu.pprof with -nats-only)")
	fs.IntVar(&o.profileFor, "profile-seconds", 20, "length of each CPU profile in seconds")
	fs.BoolVar(&o.natsOnly, "nats-only", false, "measure NATS alone instead: each code's messages moved through the contract's streams and durable consumers as the services move them, on a server of its own embedded here (not OTP_NATS_URL), with no service, database, mail or warm-up; takes -requests, -rate, -tenant, -settle, -profile, -profile-seconds and -json")
	return o
}

func (o *benchOptions) check(getenv func(string) string) error {
	if strings.TrimSpace(getenv("OTP_ENV")) == platform.EnvProduction {
		return errors.New("OTP_ENV=production: bench runs its own services with new keys and the null provider; run it against a NATS server and a database of its own")
	}
	switch {
	case o.requests < 1:
		return errors.New("-requests must be at least 1")
	case o.rate < 0 || o.verifyRate < 0:
		return errors.New("-rate and -verify-rate must not be negative")
	case o.dispatchers < 1 || o.dispatchers > 64:
		return errors.New("-dispatchers must be from 1 to 64")
	case o.verifyClients < 1 || o.verifyClients > 4096:
		return errors.New("-verify-clients must be from 1 to 4096")
	case o.warmup < 0:
		return errors.New("-warmup must not be negative")
	case o.profileFor < 1:
		return errors.New("-profile-seconds must be at least 1")
	case !events.ValidTenant(o.tenant):
		return fmt.Errorf("-tenant %q is not a tenant name", o.tenant)
	}
	switch {
	case o.sink == "null", o.sink == "maildir":
	case strings.HasPrefix(o.sink, "smtp://"):
		if o.verify {
			return errors.New("-verify needs the null or maildir sink: the bench cannot read what a relay received")
		}
	default:
		return fmt.Errorf("-sink %q: want null, maildir or smtp://host:port", o.sink)
	}
	if o.sendDelay != 0 && o.sink != "null" {
		return errors.New("-send-delay is for the null sink")
	}
	if o.natsOnly && (o.verify || o.sink != "null" || o.sendDelay != 0 || o.dispatchers != 1 || o.concurrency != 0 || o.bin != "" || o.dir != "") {
		return errors.New("-nats-only runs no service, on a NATS server of its own: it takes -requests, -rate, -tenant, -settle, -profile, -profile-seconds and -json")
	}
	return nil
}

// benchCommand runs the whole pipeline as separate processes and drives it as an upstream
// app does, then reports throughput, latency, losses and each process's CPU and memory.
func benchCommand(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) (err error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := benchFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench takes no arguments, got %q", fs.Args())
	}
	if err := o.check(getenv); err != nil {
		return err
	}
	if o.natsOnly {
		return benchNATSOnly(ctx, o, stdout, stderr)
	}
	if o.bin == "" {
		o.bin = defaultBinDir()
	}
	if err := findBinaries(o.bin); err != nil {
		return err
	}
	if o.dir == "" {
		var tmp string
		if tmp, err = os.MkdirTemp("", "otpflow-bench-"); err != nil {
			return err
		}
		defer func() { // err is the command's result
			if err != nil {
				fmt.Fprintf(stderr, "bench: the services' logs are kept in %s\n", filepath.Join(tmp, "logs"))
				return
			}
			os.RemoveAll(tmp)
		}()
		o.dir = tmp
	}
	dir, err := filepath.Abs(o.dir)
	if err != nil {
		return err
	}
	for _, d := range []string{dir, filepath.Join(dir, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if o.profile != "" {
		if err := os.MkdirAll(o.profile, 0o755); err != nil {
			return err
		}
	}
	progress := func(format string, a ...any) { fmt.Fprintf(stderr, "bench: "+format+"\n", a...) }

	// NATS: OTP_NATS_URL, else an embedded server in this process.
	url := getenv("OTP_NATS_URL")
	if url == "" {
		ns, err := startNATS(filepath.Join(dir, "nats"), -1)
		if err != nil {
			return err
		}
		defer func() { ns.Shutdown(); ns.WaitForShutdown() }()
		url = ns.ClientURL()
	}
	env := benchKeys(getenv)
	env["OTP_NATS_URL"] = url
	env["OTP_ENV"] = platform.EnvDevelopment
	env["OTP_MAIL_FROM"] = "otpflow bench <no-reply@bench.example>"
	if o.profile != "" {
		env["OTP_PPROF"] = "true"
	}
	if o.concurrency > 0 {
		env["OTP_DISPATCH_CONCURRENCY"] = strconv.Itoa(o.concurrency)
	}
	var collector *sinkCollector
	switch {
	case o.sink == "null":
		if collector, err = newSinkCollector(); err != nil {
			return err
		}
		defer collector.close()
		env["OTP_PROVIDERS"] = "null"
		env["OTP_NULL_SINK_ADDR"] = collector.addr()
		if o.sendDelay > 0 {
			env["OTP_NULL_SEND_DELAY"] = o.sendDelay.String()
		}
	case o.sink == "maildir":
		env["OTP_PROVIDERS"] = "sandbox"
		env["OTP_SANDBOX_MAILDIR"] = filepath.Join(dir, "mail")
	default:
		env["OTP_PROVIDERS"] = "smtp"
		env["OTP_SMTP_URL"] = localSMTP(o.sink)
	}

	// PostgreSQL: OTP_DATABASE_URL, else a database of the bench's own, made anew.
	dbURL := getenv("OTP_DATABASE_URL")
	if dbURL == "" {
		if !answers(ctx, "") {
			return errors.New("no PostgreSQL answers at the libpq defaults; set OTP_DATABASE_URL")
		}
		if dbURL, err = ensureDB(ctx, benchDB, true); err != nil { // made anew: runs compare
			return err
		}
	}
	prefix, err := platform.RolePrefix(getenv)
	if err != nil {
		return err
	}
	if v := getenv("OTP_DB_ROLE_PREFIX"); v != "" {
		env["OTP_DB_ROLE_PREFIX"] = v
	}
	migrateURL := dbURL
	if u := getenv("OTP_MIGRATE_DATABASE_URL"); u != "" {
		migrateURL = u
	}
	if err := migrateAll(ctx, migrateURL, prefix, io.Discard); err != nil {
		return err
	}
	env["OTP_DATABASE_URL"] = dbURL
	if err := setRoleURLs(env, dbURL, prefix); err != nil {
		return err
	}
	merged := overlay(getenv, env)
	common, err := platform.LoadCommon(merged)
	if err != nil {
		return err
	}
	nc, js, err := connectJetStream(url, merged)
	if err != nil {
		return err
	}
	defer nc.Close()
	// The load's publishes: an acknowledgement lost on the way is given up after 30 s
	// (the publish is then sent again) and stops counting against the client's limit.
	pubJS, err := platform.NewJetStream(nc, common.NATSJSAPIPrefix, jetstream.WithPublishAsyncTimeout(30*time.Second))
	if err != nil {
		return err
	}
	if getenv("OTP_NATS_URL") != "" {
		if err := natsInUse(ctx, js); err != nil {
			return err
		}
	}
	if err := provisionStreams(ctx, js, common.Streams(), io.Discard); err != nil {
		return err
	}

	// The services, each its own process.
	names := []struct{ binary, name string }{{"issuer", "issuer"}, {"verifier", "verifier"}, {"auditor", "auditor"}}
	for i := 1; i <= o.dispatchers; i++ {
		name := "dispatcher"
		if o.dispatchers > 1 {
			name = fmt.Sprintf("dispatcher-%d", i)
		}
		names = append(names, struct{ binary, name string }{"dispatcher", name})
	}
	var procs []*benchProc
	defer func() {
		var wg sync.WaitGroup
		for _, p := range procs {
			wg.Go(func() { p.stop(30 * time.Second) })
		}
		wg.Wait()
	}()
	for _, n := range names {
		p, err := startBenchProc(o.bin, n.binary, n.name, filepath.Join(dir, "logs"), env)
		if err != nil {
			return err
		}
		procs = append(procs, p)
	}
	for _, p := range procs {
		if err := p.ready(ctx, 60*time.Second); err != nil {
			return err
		}
	}
	progress("%d processes ready (%s); NATS %s; logs in %s", len(procs), strings.Join(procNames(procs), ", "), url, filepath.Join(dir, "logs"))

	// What the pipeline says, read as an app would from OTP_EVENTS.
	run := randomHex(4)
	warm, load := newBenchLedger(run+"w"), newBenchLedger(run+"r")
	watch, err := js.OrderedConsumer(ctx, events.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{
			string(events.TypeIssued) + "." + o.tenant, string(events.TypeDelivered) + "." + o.tenant,
			string(events.TypeDeliveryFailed) + "." + o.tenant, string(events.TypeDispatchExpired) + "." + o.tenant,
			string(events.TypeRejected) + "." + o.tenant,
		},
		DeliverPolicy: jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return fmt.Errorf("read OTP_EVENTS: %w", err)
	}
	cc, err := watch.Consume(func(m jetstream.Msg) { warm.addMsg(m); load.addMsg(m) })
	if err != nil {
		return fmt.Errorf("read OTP_EVENTS: %w", err)
	}
	defer cc.Stop()

	if o.warmup > 0 {
		progress("warm-up: %d requests", o.warmup)
		if _, _, err := publishLoad(ctx, pubJS, o.tenant, warm.prefix, o.warmup, 0, nil); err != nil {
			return err
		}
		if err := awaitSettled(ctx, warm, o.warmup, o.settle, procs); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}

	// A new database has no planner statistics until autovacuum first analyzes it (up
	// to a minute): until then, and with statistics of near-empty tables, lookups by key
	// plan (and stay cached, in each connection's prepared statements) as scans of the
	// whole table, each costing more as the run fills it. A database in service has its
	// statistics; give the run's the same, taken after the warm-up.
	o.adminURL = migrateURL
	if err := analyze(ctx, migrateURL); err != nil {
		return err
	}

	// The measured load.
	for _, p := range procs {
		p.cpu0, _, _ = procUsage(p.cmd.Process.Pid)
	}
	self0, _, _ := procUsage(os.Getpid())
	pg0 := postgresCPU()
	var profiling sync.WaitGroup
	var profileErr atomic.Pointer[error]
	if o.profile != "" {
		for _, p := range procs {
			profiling.Go(func() {
				path := filepath.Join(o.profile, p.name+".cpu.pprof")
				if err := p.profile(ctx, "profile", fmt.Sprintf("seconds=%d", o.profileFor), path); err != nil {
					profileErr.Store(&err)
				}
			})
		}
		// This process too: the load generator, the sink's collector, the event reader
		// and, unless OTP_NATS_URL names another, the NATS server share the box.
		profiling.Go(func() {
			if err := profileSelf(ctx, filepath.Join(o.profile, "bench.cpu.pprof"), time.Duration(o.profileFor)*time.Second); err != nil {
				profileErr.Store(&err)
			}
		})
	}
	progress("load: %d requests at %s, sink %s, %d dispatcher(s)", o.requests, rateText(o.rate), o.sink, o.dispatchers)
	tick := func() {
		if collector != nil {
			load.feedNullSink(collector)
		}
		load.match()
	}
	var published atomic.Int64
	loadStart := time.Now()
	pubErr := make(chan error, 1)
	var accepted int
	var pubDone time.Time
	go func() {
		n, done, err := publishLoad(ctx, pubJS, o.tenant, load.prefix, o.requests, o.rate, &published)
		accepted, pubDone = n, done
		pubErr <- err
	}()
	stopProgress := make(chan struct{})
	var progressWG sync.WaitGroup
	progressWG.Go(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-stopProgress:
				return
			case <-t.C:
				tick()
				issued, delivered, settled := load.counts()
				progress("%5.0fs published %d/%d  issued %d  delivered %d  settled %d", time.Since(loadStart).Seconds(), published.Load(), o.requests, issued, delivered, settled)
			}
		}
	})
	err = <-pubErr
	if err == nil {
		err = awaitSettled(ctx, load, accepted, o.settle, procs)
		if errors.Is(err, errStalled) {
			progress("no outcome for %v; counting the rest as lost", o.settle)
			err = nil
		}
	}
	close(stopProgress)
	progressWG.Wait()
	if err != nil {
		return err
	}
	// Usage of the load phase, before the verify phase adds to it.
	res := benchResult{Requests: o.requests, Rate: o.rate, Sink: sinkName(o.sink), Dispatchers: o.dispatchers, Concurrency: dispatchConcurrency(merged),
		Accepted: accepted, Services: map[string]benchUsage{}}
	for _, p := range procs {
		select {
		case <-p.exited:
			return fmt.Errorf("%s is gone (%v):\n%s", p.name, p.waitErr, p.logTail())
		default:
		}
		cpu, rss, _ := procUsage(p.cmd.Process.Pid) // zero where /proc does not say
		res.Services[p.name] = benchUsage{CPUSeconds: round(max(cpu-p.cpu0, 0), 2), PeakRSSMB: round(rss, 1)}
	}
	res.DatabaseCPU = databaseCPU(ctx, merged, pg0)
	self1, selfRSS, _ := procUsage(os.Getpid())
	res.Bench = benchUsage{CPUSeconds: round(self1-self0, 2), PeakRSSMB: round(selfRSS, 1)}
	profiling.Wait() // a profile longer than the load ends when its seconds do
	if o.profile != "" {
		for _, p := range procs {
			if err := p.profile(ctx, "allocs", "", filepath.Join(o.profile, p.name+".allocs.pprof")); err != nil {
				profileErr.Store(&err)
			}
		}
	}

	if collector != nil {
		// What the null provider wrote before its jobs were reported may still be on
		// its way through the collector.
		for wait := time.Now().Add(5 * time.Second); time.Now().Before(wait); time.Sleep(20 * time.Millisecond) {
			tick()
			if load.unmailed() == 0 {
				break
			}
		}
	}
	if o.sink == "maildir" {
		if err := load.feedMaildir(filepath.Join(dir, "mail")); err != nil {
			return err
		}
	}
	tick()
	load.summarise(&res, pubDone.Sub(loadStart), o.sink != "null" && o.sink != "maildir")
	res.LatencyEnd = "delivered_event"
	if o.sink == "null" {
		res.LatencyEnd = "provider_answer"
	}

	if o.verify {
		var verifierProc *benchProc
		for _, p := range procs {
			if p.name == "verifier" {
				verifierProc = p
			}
		}
		if o.profile != "" {
			profiling.Go(func() {
				path := filepath.Join(o.profile, "verifier.verify.cpu.pprof")
				if err := verifierProc.profile(ctx, "profile", fmt.Sprintf("seconds=%d", o.profileFor), path); err != nil {
					profileErr.Store(&err)
				}
			})
		}
		if err := benchVerify(ctx, nc, js, o, load, &res, progress); err != nil {
			return err
		}
		profiling.Wait()
	}
	if p := profileErr.Load(); p != nil {
		return *p
	}
	if o.profile != "" {
		res.Profiles, _ = filepath.Abs(o.profile)
	}
	if o.json {
		enc := json.NewEncoder(stdout)
		return enc.Encode(res)
	}
	printBench(stdout, res)
	return nil
}

// databaseCPU attributes the CPU PostgreSQL's processes used since before (by pid) to
// the roles of the backends, as pg_stat_activity names them now.
func databaseCPU(ctx context.Context, getenv func(string) string, before map[int]float64) map[string]float64 {
	after := postgresCPU()
	if len(after) == 0 {
		return nil
	}
	roles := map[int]string{}
	if c, err := pgx.Connect(ctx, getenv("OTP_DATABASE_URL")); err == nil {
		rows, err := c.Query(ctx, `SELECT pid, coalesce(usename, '') FROM pg_stat_activity WHERE datname = current_database()`)
		if err == nil {
			var pid int32
			var role string
			_, _ = pgx.ForEachRow(rows, []any{&pid, &role}, func() error {
				roles[int(pid)] = role
				return nil
			})
		}
		c.Close(ctx)
	}
	out := map[string]float64{}
	for pid, cpu := range after {
		role := roles[pid]
		if role == "" {
			role = "other"
		}
		out[role] += cpu - before[pid]
	}
	for r, v := range out {
		out[r] = round(v, 2)
	}
	return out
}

// analyze gathers the planner's statistics of every table of the database at url.
func analyze(ctx context.Context, url string) error {
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		return fmt.Errorf("analyze: %w", err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, "ANALYZE"); err != nil {
		return fmt.Errorf("analyze: %w", err)
	}
	return nil
}

// localSMTP is sink with tls=none added when it names no TLS mode and a loopback relay
// (Mailpit and its kind speak no TLS); a remote relay keeps the provider's default,
// STARTTLS.
func localSMTP(sink string) string {
	u, err := neturl.Parse(sink)
	if err != nil || u.Query().Has("tls") || !platform.IsLocalHost(u.Hostname()) {
		return sink
	}
	q := u.Query()
	q.Set("tls", "none")
	u.RawQuery = q.Encode()
	return u.String()
}

// natsInUse refuses a NATS server where another pipeline's services pull from the
// durables the bench's would share: they would take each other's work (and the bench's
// dispatcher, codes it cannot open).
func natsInUse(ctx context.Context, js jetstream.JetStream) error {
	for _, sc := range []struct{ stream, consumer string }{
		{events.StreamDispatch, events.ConsumerDispatcher}, {events.StreamEvents, events.ConsumerAuditor},
		{events.StreamChallenges, events.ConsumerVerifier},
	} {
		c, err := js.Consumer(ctx, sc.stream, sc.consumer)
		if err != nil {
			continue // not provisioned yet: nobody reads it
		}
		info, err := c.Info(ctx)
		if err == nil && info.NumWaiting > 0 {
			return fmt.Errorf("another pipeline reads %s on %s at OTP_NATS_URL (%d pull requests waiting): bench needs a NATS server of its own", sc.consumer, sc.stream, info.NumWaiting)
		}
	}
	return nil
}

// benchDB is the database the bench makes anew on the libpq-default server.
const benchDB = "otpflow_bench"

// benchKeys are new keys for one run, each taken from the environment when it sets it.
func benchKeys(getenv func(string) string) map[string]string {
	env := map[string]string{}
	for _, k := range []struct{ name, id string }{{"OTP_CODE_PEPPER", "b1"}, {"OTP_SEAL_KEY", "b1"}, {"OTP_AUDIT_KEY", "b1"},
		{"OTP_AUDIT_CHAIN_KEY", "bc1"}, {"OTP_AUDIT_SIGNING_KEY", "bs1"}, {"OTP_SUBJECT_KEY", "bk1"}, {"OTP_DLQ_KEY", "bd1"}} {
		if v := getenv(k.name); v != "" {
			env[k.name] = v
			continue
		}
		env[k.name] = keys.Generate(k.id, 32)
	}
	return env
}

// publishLoad publishes n otp.requested events as an app does (plain JSON, the request id
// as Nats-Msg-Id), at rate per second or as fast as the stream acknowledges, and returns
// how many the stream stored and when the last was acknowledged. A publish the stream
// does not acknowledge is sent again, as an app with a retry policy does.
func publishLoad(ctx context.Context, js jetstream.JetStream, tenant, prefix string, n, rate int, count *atomic.Int64) (int, time.Time, error) {
	subject := string(events.TypeRequested) + "." + tenant
	type pending struct {
		msg *nats.Msg
		ack jetstream.PubAckFuture
	}
	inflight := make(chan pending, 4096)
	var stored atomic.Int64
	var last atomic.Int64
	acks := make(chan error, 1)
	go func() {
		var first error
		for p := range inflight {
			var err error
			select {
			case <-p.ack.Ok():
			case err = <-p.ack.Err():
			case <-ctx.Done():
				err = ctx.Err()
			}
			for tries := 0; err != nil && ctx.Err() == nil && tries < 10; tries++ {
				_, err = js.PublishMsg(ctx, p.msg)
			}
			if err != nil {
				if first == nil {
					first = fmt.Errorf("publish %s: %w", p.msg.Header.Get(jetstream.MsgIDHeader), err)
				}
				continue
			}
			stored.Add(1)
			last.Store(time.Now().UnixNano())
		}
		acks <- first
	}()
	start := time.Now()
	var err error
	for i := range n {
		if rate > 0 {
			if wait := time.Until(start.Add(time.Duration(i) * time.Second / time.Duration(rate))); wait > 0 {
				select {
				case <-time.After(wait):
				case <-ctx.Done():
				}
			}
		}
		if err = ctx.Err(); err != nil {
			break
		}
		id := fmt.Sprintf("%s%07d", prefix, i)
		body, _ := json.Marshal(events.Requested{RequestID: id, Recipient: fmt.Sprintf("u%d.%s@bench.example", i, prefix), Purpose: "login"})
		msg := &nats.Msg{Subject: subject, Data: body, Header: nats.Header{jetstream.MsgIDHeader: []string{id}}}
		var ack jetstream.PubAckFuture
		for {
			ack, err = js.PublishMsgAsync(msg)
			if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				break
			}
			// As many unacknowledged as the client allows: wait for the stream to catch up.
			select {
			case <-js.PublishAsyncComplete():
			case <-time.After(time.Second):
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				break
			}
		}
		if err != nil {
			break
		}
		inflight <- pending{msg, ack}
		if count != nil {
			count.Add(1)
		}
	}
	close(inflight)
	if aerr := <-acks; err == nil {
		err = aerr
	}
	return int(stored.Load()), time.Unix(0, last.Load()), err
}

// awaitSettled waits until want requests of l have an outcome, or none comes for settle
// (errStalled).
func awaitSettled(ctx context.Context, l *benchLedger, want int, settle time.Duration, procs []*benchProc) error {
	_, _, last := l.counts()
	lastChange := time.Now()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		_, _, settled := l.counts()
		if settled >= want {
			return nil
		}
		if settled != last {
			last, lastChange = settled, time.Now()
		} else if time.Since(lastChange) > settle {
			return fmt.Errorf("%w: %d of %d requests reached an outcome", errStalled, settled, want)
		}
		for _, p := range procs {
			select {
			case <-p.exited:
				return fmt.Errorf("%s exited during the run (%v):\n%s", p.name, p.waitErr, p.logTail())
			default:
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// summarise fills res from the ledger. sinkBlind: the bench cannot see the mail (a
// remote relay), so losses and duplicates are by the events alone.
func (l *benchLedger) summarise(res *benchResult, publishFor time.Duration, sinkBlind bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	res.Issued, res.Delivered, res.Rejected = l.issued, l.delivered, len(l.rejected)
	var lat, issueLat []float64
	var first, lastAnswer time.Time
	settled := len(l.rejected)
	dups := 0
	for _, c := range l.requests {
		if c.outcome != "" {
			settled++
		}
		switch c.outcome {
		case "delivery_failed", "dispatch_expired":
			res.Failed++
		case "delivered":
			if !sinkBlind && c.mailed == 0 {
				res.Lost++ // the provider said yes and nothing arrived
			}
			// The end: the provider's answer where the sink tells it (the null sink),
			// else otp.delivered's delivered_at, which the dispatcher stamps once the
			// send is recorded (a record batch later).
			end := c.deliveredAt
			if !c.mailedAt.IsZero() {
				end = c.mailedAt
			}
			if !c.requestedAt.IsZero() {
				lat = append(lat, float64(end.Sub(c.requestedAt))/float64(time.Millisecond))
				issueLat = append(issueLat, float64(c.issuedAt.Sub(c.requestedAt))/float64(time.Millisecond))
				if first.IsZero() || c.requestedAt.Before(first) {
					first = c.requestedAt
				}
			}
			if end.After(lastAnswer) {
				lastAnswer = end
			}
		}
		// A code mailed, or reported delivered, more than once.
		dups += max(c.mailed-1, c.deliveredEvents-1, 0)
	}
	res.Duplicates = dups
	res.Lost += max(0, res.Accepted-settled)
	res.LatencyMS, res.IssueLatencyMS = percentiles(lat), percentiles(issueLat)
	if !first.IsZero() && lastAnswer.After(first) {
		res.DurationS = round(lastAnswer.Sub(first).Seconds(), 3)
		res.OTPsPerSec = round(float64(res.Delivered)/lastAnswer.Sub(first).Seconds(), 1)
	}
	if l.lastIssue.After(l.firstIssue) && !first.IsZero() {
		res.IssuedPerSec = round(float64(l.issued)/l.lastIssue.Sub(first).Seconds(), 1)
	}
	if publishFor > 0 {
		res.PublishPerSec = round(float64(res.Accepted)/publishFor.Seconds(), 1)
	}
}

// benchVerify verifies every delivered code the sink returned, as users typing their
// codes do, with o.verifyClients clients at o.verifyRate per second (0: flat out).
func benchVerify(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, o *benchOptions, l *benchLedger, res *benchResult, progress func(string, ...any)) error {
	type job struct{ requestID, code string }
	var jobs []job
	l.mu.Lock()
	for _, c := range l.requests {
		if c.outcome == "delivered" && c.code != "" {
			jobs = append(jobs, job{c.requestID, c.code})
		}
	}
	l.mu.Unlock()
	if len(jobs) == 0 {
		return errors.New("no code to verify: none was delivered and read from the sink")
	}
	// The verifier answers not_found for a challenge it has not projected yet: start when
	// its projection has caught up, as the users of a real app would (their mail comes later).
	if err := awaitCaughtUp(ctx, js, events.StreamChallenges, events.ConsumerVerifier, time.Minute); err != nil {
		return err
	}
	// The auditor may still be chaining the load's events: let it finish, so the phase
	// measures verification, not verification beside the load's tail.
	if err := awaitCaughtUp(ctx, js, events.StreamEvents, events.ConsumerAuditor, 5*time.Minute); err != nil {
		return err
	}
	// The verifier's tables were empty when the warm-up's statistics were taken.
	if err := analyze(ctx, o.adminURL); err != nil {
		return err
	}
	progress("verify: %d codes, %d clients at %s", len(jobs), o.verifyClients, rateText(o.verifyRate))
	subject := string(events.TypeVerify) + "." + o.tenant
	work := make(chan job)
	var mu sync.Mutex
	statuses := map[string]int{}
	var lat []float64
	var firstErr error
	var wg sync.WaitGroup
	start := time.Now()
	for range o.verifyClients {
		wg.Go(func() {
			for j := range work {
				body, _ := json.Marshal(events.VerifyRequest{RequestID: j.requestID, Code: j.code})
				status, took, err := verifyOnce(ctx, nc, subject, body)
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
					statuses["error"]++
				} else {
					statuses[string(status)]++
					lat = append(lat, float64(took)/float64(time.Millisecond))
				}
				mu.Unlock()
			}
		})
	}
	for i, j := range jobs {
		if o.verifyRate > 0 {
			if wait := time.Until(start.Add(time.Duration(i) * time.Second / time.Duration(o.verifyRate))); wait > 0 {
				time.Sleep(wait)
			}
		}
		if ctx.Err() != nil {
			break
		}
		work <- j
	}
	close(work)
	wg.Wait()
	took := time.Since(start)
	res.Verified = statuses[string(events.StatusVerified)]
	res.VerifyStatuses = statuses
	res.VerifyPerSec = round(float64(len(lat))/took.Seconds(), 1)
	res.VerifyLatencyMS = percentiles(lat)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if statuses["error"] > 0 {
		return fmt.Errorf("%d verifies got no answer: %w", statuses["error"], firstErr)
	}
	return nil
}

// awaitCaughtUp waits until the durable consumer has nothing pending or unacknowledged.
func awaitCaughtUp(ctx context.Context, js jetstream.JetStream, stream, consumer string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		c, err := js.Consumer(ctx, stream, consumer)
		if err == nil {
			info, ierr := c.Info(ctx)
			if ierr == nil && info.NumPending == 0 && info.NumAckPending == 0 {
				return nil
			}
			err = ierr
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s on %s did not catch up within %v (%v)", consumer, stream, within, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// verifyOnce asks otp.verify once and times the answer. A service error is an error.
func verifyOnce(ctx context.Context, nc *nats.Conn, subject string, body []byte) (events.VerifyStatus, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	start := time.Now()
	msg, err := nc.RequestWithContext(ctx, subject, body)
	took := time.Since(start)
	if err != nil {
		return "", took, err
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return "", took, fmt.Errorf("verify: service error %s: %s", code, msg.Header.Get(micro.ErrorHeader))
	}
	var r events.VerifyReply
	if err := json.Unmarshal(msg.Data, &r); err != nil {
		return "", took, fmt.Errorf("verify reply %q: %w", msg.Data, err)
	}
	return r.Status, took, nil
}

// percentiles of xs in milliseconds, rounded to 0.01 ms.
func percentiles(xs []float64) benchLatency {
	if len(xs) == 0 {
		return benchLatency{}
	}
	slices.Sort(xs)
	at := func(q float64) float64 {
		i := int(q*float64(len(xs))+0.5) - 1
		return round(xs[min(max(i, 0), len(xs)-1)], 2)
	}
	return benchLatency{P50: at(0.50), P95: at(0.95), P99: at(0.99), Max: round(xs[len(xs)-1], 2)}
}

func round(x float64, places int) float64 {
	p := 1.0
	for range places {
		p *= 10
	}
	if x < 0 {
		return -float64(int64(-x*p+0.5)) / p
	}
	return float64(int64(x*p+0.5)) / p
}

func rateText(rate int) string {
	if rate == 0 {
		return "full speed"
	}
	return fmt.Sprintf("%d/s", rate)
}

// sinkName is the sink for the report: an smtp:// URL without its credentials.
func sinkName(sink string) string {
	if strings.HasPrefix(sink, "smtp://") {
		if at := strings.LastIndex(sink, "@"); at >= 0 {
			return "smtp://" + sink[at+1:]
		}
	}
	return sink
}

func dispatchConcurrency(getenv func(string) string) int {
	n, err := platform.IntVar(getenv, "OTP_DISPATCH_CONCURRENCY", 16, 1, 1000)
	if err != nil {
		return 0
	}
	return n
}

func procNames(procs []*benchProc) []string {
	var out []string
	for _, p := range procs {
		out = append(out, p.name)
	}
	return out
}

// printBench writes the result for a person.
func printBench(w io.Writer, r benchResult) {
	fmt.Fprintf(w, "requests      %d at %s, sink %s, %d dispatcher(s) of concurrency %d\n", r.Requests, rateText(r.Rate), r.Sink, r.Dispatchers, r.Concurrency)
	fmt.Fprintf(w, "outcome       %d stored, %d issued, %d delivered, %d rejected, %d failed; lost %d, duplicates %d\n",
		r.Accepted, r.Issued, r.Delivered, r.Rejected, r.Failed, r.Lost, r.Duplicates)
	fmt.Fprintf(w, "throughput    %.1f OTPs/s end to end over %.2fs (published %.1f/s, issued %.1f/s)\n", r.OTPsPerSec, r.DurationS, r.PublishPerSec, r.IssuedPerSec)
	fmt.Fprintf(w, "latency       p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, max %.1f ms (stored -> provider accepted)\n", r.LatencyMS.P50, r.LatencyMS.P95, r.LatencyMS.P99, r.LatencyMS.Max)
	fmt.Fprintf(w, "  of which    p50 %.1f ms, p99 %.1f ms to the code's issue\n", r.IssueLatencyMS.P50, r.IssueLatencyMS.P99)
	if r.VerifyStatuses != nil {
		fmt.Fprintf(w, "verify        %d verified, %.1f/s, p50 %.1f ms, p99 %.1f ms; answers %v\n", r.Verified, r.VerifyPerSec, r.VerifyLatencyMS.P50, r.VerifyLatencyMS.P99, r.VerifyStatuses)
	}
	names := make([]string, 0, len(r.Services))
	for n := range r.Services {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		u := r.Services[n]
		fmt.Fprintf(w, "%-13s %.2f CPU s, peak RSS %.1f MB\n", n, u.CPUSeconds, u.PeakRSSMB)
	}
	fmt.Fprintf(w, "%-13s %.2f CPU s, peak RSS %.1f MB\n", "bench", r.Bench.CPUSeconds, r.Bench.PeakRSSMB)
	roles := make([]string, 0, len(r.DatabaseCPU))
	for role := range r.DatabaseCPU {
		roles = append(roles, role)
	}
	slices.Sort(roles)
	for _, role := range roles {
		fmt.Fprintf(w, "postgres      %.2f CPU s as %s\n", r.DatabaseCPU[role], role)
	}
	if r.Profiles != "" {
		fmt.Fprintf(w, "profiles      %s\n", r.Profiles)
	}
}

// profileSelf saves this process's CPU profile over d, or until ctx ends.
func profileSelf(ctx context.Context, path string, d time.Duration) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return fmt.Errorf("bench CPU profile: %w", err)
	}
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
	pprof.StopCPUProfile()
	return f.Close()
}
