package main

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/platform/keys"
	"github.com/otpflow/otpflow/services/auditor"
	"github.com/otpflow/otpflow/services/dispatcher"
	"github.com/otpflow/otpflow/services/issuer"
	"github.com/otpflow/otpflow/services/verifier"
	"golang.org/x/sync/errgroup"
)

// NATS alone (otpflow bench -nats-only): what moving each code's messages through
// JetStream costs the box when nothing else runs. The contract's streams and durable
// consumers, as provisioning makes them with the default options, on a NATS server
// embedded as the bench embeds its own; each code's messages with the services' payloads
// and headers, its ids, hashes and times its own; each service on a connection of its
// own, each durable read with the service's consumer (platform.Consumer) at the
// service's default batch size and linger, publishing as it does and acknowledging each
// message. No database, no mail, no decision.

// natsOnlyResult is what -nats-only -json prints.
type natsOnlyResult struct {
	Mode       string  `json:"mode"` // "nats-only"
	Requests   int     `json:"requests"`
	Delivered  int     `json:"delivered"`
	Lost       int     `json:"lost"`
	Duplicates int     `json:"duplicates"`
	DurationS  float64 `json:"duration_s"`
	// CodesPerSec is first request published → the last otp.delivered read, as an app
	// reads it from OTP_EVENTS.
	CodesPerSec float64 `json:"codes_per_sec"`
	// CPUSeconds is this process's CPU (the server and every stage) from the first
	// publish until every durable consumer has no message pending or unacknowledged.
	CPUSeconds   float64 `json:"cpu_s"`
	CPUMSPerCode float64 `json:"cpu_ms_per_code"`
	// Cores is GOMAXPROCS: the cores this process may use (a container's CPU limit).
	Cores int `json:"cores"`
	// BoxCodesPerSec is what those cores would move if NATS had them all:
	// cores × 1,000 / CPUMSPerCode.
	BoxCodesPerSec float64 `json:"box_codes_per_sec"`
	// StoredPerCode is the messages the streams stored a code; DeliveredPerCode the
	// messages handed to a reader a code (the durables and the app's reader).
	StoredPerCode    float64 `json:"stored_per_code"`
	DeliveredPerCode float64 `json:"delivered_per_code"`
	// Handled is, per "<stream>/<durable>", the messages its stage acknowledged.
	Handled map[string]int `json:"handled"`
	// Drained: by the end, no durable had a message pending or unacknowledged.
	Drained  bool   `json:"drained"`
	Profiles string `json:"profiles,omitempty"`
}

// natsStage is one durable consumer on a code's path and what its service publishes for
// each message it reads, besides its own work.
type natsStage struct {
	service, stream, durable string
	batch, prefetch          int
	linger                   time.Duration
	ordered                  bool
	// publish sends what a batch leads to (nil: nothing).
	publish func(ctx context.Context, js jetstream.JetStream, batch []*platform.Delivery) error
}

// natsStagesOf is natsStages; a test puts a failing stage in its place.
var natsStagesOf = natsStages

// natsStages are the services' consumers on a code's path with their default batch
// sizes and lingers: the issuer publishes a code's challenge, then (its outbox's First)
// its otp.issued and sealed dispatch job; the dispatcher an otp.delivered per job.
func natsStages(t *natsTemplates) []natsStage {
	return []natsStage{
		{service: "issuer", stream: events.StreamRequests, durable: events.ConsumerIssuer, batch: issuer.DefaultBatchSize,
			publish: t.issue},
		{service: "dispatcher", stream: events.StreamDispatch, durable: events.ConsumerDispatcher,
			batch: dispatcher.DefaultConcurrency, prefetch: dispatcher.DefaultConcurrency, publish: t.deliver},
		{service: "verifier", stream: events.StreamChallenges, durable: events.VerifierConsumer.Durable, batch: verifier.DefaultBatchSize},
		{service: "verifier", stream: events.StreamEvents, durable: events.VerifierLegacyConsumer.Durable, batch: verifier.DefaultBatchSize},
		{service: "verifier", stream: events.StreamEvents, durable: events.VerifierStatusConsumer.Durable, batch: verifier.DefaultBatchSize,
			linger: verifier.DefaultStatusLinger},
		{service: "auditor", stream: events.StreamEvents, durable: events.AuditorConsumer.Durable, batch: auditor.DefaultBatchSize,
			linger: auditor.DefaultLinger, ordered: true},
	}
}

// The placeholders of the templates, which each code replaces with its own values.
const (
	natsChallengeID = "00000000-0000-4000-8000-000000000000"
	natsRequestID   = "nats-only-000000"
	natsTimeLayout  = "2006-01-02T15:04:05.000000000Z07:00" // fixed width
)

var (
	natsIssuedAt  = time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC)
	natsExpiresAt = natsIssuedAt.Add(10 * time.Minute)
	natsHash      = "nk1:" + strings.Repeat("h", 43)
)

// natsTemplates are one code's messages as the services build them; each code gets a
// copy with its own ids, hashes and times, as OTP_EVENTS (compressed) would hold them,
// and random bytes where its HMAC and its sealed job are.
type natsTemplates struct {
	challenge, issued, dispatch, delivered *nats.Msg
	hmac, sealed                           string // the random parts, base64 as in the JSON
	parts                                  map[*nats.Msg][]natsPart
	// requests are the request id of each code issued, for its otp.delivered.
	requests sync.Map
}

func newNATSTemplates(tenant string) (*natsTemplates, error) {
	sealer, err := keys.ParseSealer(keys.Generate("n1", 32))
	if err != nil {
		return nil, err
	}
	id, rid, now, exp := natsChallengeID, natsRequestID, natsIssuedAt, natsExpiresAt
	env := events.Envelope{Source: "otpflow/issuer", Time: now}
	t := &natsTemplates{hmac: base64.StdEncoding.EncodeToString(make([]byte, 32))}
	if t.challenge, err = events.NewMsg(events.TypeChallenge, tenant, "challenge:"+id+":1", id, events.Challenge{
		ChallengeID: id, Tenant: tenant, RequestID: rid, CodeSeq: 1, CodeLength: 6, CodeHMAC: make([]byte, 32),
		PepperKeyID: "n1", MaxAttempts: 5, RecipientHashes: []string{natsHash}, IssuedAt: now, ExpiresAt: exp,
	}, env); err != nil {
		return nil, err
	}
	if t.issued, err = events.NewMsg(events.TypeIssued, tenant, "issued:"+id+":1", id, events.Issued{
		ChallengeID: id, Tenant: tenant, RequestID: rid, CodeSeq: 1, RecipientHash: natsHash,
		RecipientMasked: "u***@bench.example", Purpose: "login", Locale: "en", CodeLength: 6, MaxAttempts: 5,
		IssuedAt: now, ExpiresAt: exp, RequestedAt: now,
	}, env); err != nil {
		return nil, err
	}
	job, err := sealer.SealJob(events.DispatchJob{ChallengeID: id, Tenant: tenant, RequestID: rid, CodeSeq: 1,
		Recipient: "u1234567.0123abcdn@bench.example", // as the bench's Purpose: "login", Locale: "en", IssuedAt: now, ExpiresAt: exp,
		Code:      "123456"})
	if err != nil {
		return nil, err
	}
	t.sealed = base64.StdEncoding.EncodeToString(job.Sealed)
	if t.dispatch, err = events.NewMsg(events.TypeDispatch, tenant, "dispatch:"+id+":1", id, job, env); err != nil {
		return nil, err
	}
	env.Source = "otpflow/dispatcher"
	if t.delivered, err = events.NewMsg(events.TypeDelivered, tenant, "delivered:"+id+":1", id, events.Delivered{
		ChallengeID: id, Tenant: tenant, RequestID: rid, CodeSeq: 1, Provider: "null", ProviderMessageID: "null-1234567",
		Attempts: 1, ProviderAttempts: []events.ProviderAttempt{{Provider: "null", Outcome: "ok", At: now}}, DeliveredAt: now,
	}, env); err != nil {
		return nil, err
	}
	// What each code changes must be there to change (the job is sealed whole).
	for _, m := range []*nats.Msg{t.challenge, t.issued, t.delivered} {
		if !bytes.Contains(m.Data, []byte(id)) || !bytes.Contains(m.Data, []byte(now.Format(natsTimeLayout))) {
			return nil, fmt.Errorf("nats-only: the %s template lacks its placeholders", m.Subject)
		}
	}
	if !bytes.Contains(t.challenge.Data, []byte(t.hmac)) || !bytes.Contains(t.dispatch.Data, []byte(t.sealed)) {
		return nil, errors.New("nats-only: the templates lack their random parts")
	}
	t.parts = map[*nats.Msg][]natsPart{}
	for _, m := range []*nats.Msg{t.challenge, t.issued, t.dispatch, t.delivered} {
		t.parts[m] = split(m.Data, t.placeholders())
	}
	return t, nil
}

// natsCode is one code: its challenge id and the values of the placeholders, in the
// order of placeholders.
type natsCode struct {
	id     string
	values []string
}

// placeholders are what the templates hold in place of a code's own values.
func (t *natsTemplates) placeholders() []string {
	return []string{natsChallengeID, natsRequestID, natsHash, natsIssuedAt.Format(natsTimeLayout),
		natsExpiresAt.Format(natsTimeLayout), t.hmac, t.sealed}
}

// issuedCode is the code of requestID as the issuer makes it: its id follows from the
// request, as a redelivered request's does in service, so that a batch published again
// is deduplicated; its hash, HMAC and sealed job are new.
func (t *natsTemplates) issuedCode(requestID string) natsCode {
	b := sha256.Sum256([]byte(requestID))
	id := fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
	t.requests.Store(id, requestID)
	now := time.Now().UTC()
	return natsCode{id: id, values: []string{id, requestID, "nk1:" + base64.RawURLEncoding.EncodeToString(randomBytes(32)),
		now.Format(natsTimeLayout), now.Add(10 * time.Minute).Format(natsTimeLayout),
		randomBase64Like(t.hmac), randomBase64Like(t.sealed)}}
}

// deliveredCode is code id as the dispatcher reports it: its request id and the time
// (otp.delivered holds no hash or secret).
func (t *natsTemplates) deliveredCode(id string) (natsCode, bool) {
	requestID, ok := t.requests.Load(id)
	if !ok {
		return natsCode{}, false
	}
	now := time.Now().UTC().Format(natsTimeLayout)
	return natsCode{id: id, values: []string{id, requestID.(string), "", now, now, "", ""}}, true
}

// randomBytes are n random bytes: a code's ciphertext and HMAC do not compress.
func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = crand.Read(b)
	return b
}

// randomBase64Like is random base64 as long as s.
func randomBase64Like(s string) string {
	return base64.StdEncoding.EncodeToString(randomBytes(base64.StdEncoding.DecodedLen(len(s))))[:len(s)]
}

// natsPart is a piece of a template: literal bytes, or placeholder ph (lit nil).
type natsPart struct {
	lit []byte
	ph  int
}

// split cuts data at every placeholder.
func split(data []byte, placeholders []string) []natsPart {
	var parts []natsPart
	for len(data) > 0 {
		at, which := len(data), -1
		for i, p := range placeholders {
			if j := bytes.Index(data, []byte(p)); j >= 0 && j < at {
				at, which = j, i
			}
		}
		if at > 0 {
			parts = append(parts, natsPart{lit: data[:at]})
		}
		if which < 0 {
			break
		}
		parts = append(parts, natsPart{ph: which})
		data = data[at+len(placeholders[which]):]
	}
	return parts
}

// as is tpl with c's values in place of the placeholders.
func (t *natsTemplates) as(tpl *nats.Msg, kind string, c natsCode) *nats.Msg {
	data := make([]byte, 0, len(tpl.Data)+64)
	for _, p := range t.parts[tpl] {
		if p.lit != nil {
			data = append(data, p.lit...)
		} else {
			data = append(data, c.values[p.ph]...)
		}
	}
	m := &nats.Msg{Subject: tpl.Subject, Data: data, Header: maps.Clone(tpl.Header)}
	m.Header.Set(jetstream.MsgIDHeader, kind+":"+c.id+":1")
	m.Header.Set(events.HeaderID, kind+":"+c.id+":1")
	m.Header.Set(events.HeaderSubject, c.id)
	m.Header.Set(events.HeaderTime, time.Now().UTC().Format(time.RFC3339Nano))
	m.Header.Set(events.HeaderTraceParent, events.ChildTraceParent(""))
	return m
}

// issue publishes, as the issuer's outbox does, the batch's challenges and, once they
// are stored, its otp.issued and dispatch jobs.
func (t *natsTemplates) issue(ctx context.Context, js jetstream.JetStream, batch []*platform.Delivery) error {
	first, rest := make([]*nats.Msg, 0, len(batch)), make([]*nats.Msg, 0, 2*len(batch))
	for _, d := range batch {
		var r events.Requested
		if err := json.Unmarshal(d.Data(), &r); err != nil || r.RequestID == "" {
			return fmt.Errorf("nats-only: stream sequence %d is not a request", d.Meta().Sequence)
		}
		c := t.issuedCode(r.RequestID)
		first = append(first, t.as(t.challenge, "challenge", c))
		rest = append(rest, t.as(t.issued, "issued", c), t.as(t.dispatch, "dispatch", c))
	}
	if err := platform.PublishAll(ctx, js, first); err != nil {
		return err
	}
	return platform.PublishAll(ctx, js, rest)
}

// deliver publishes an otp.delivered per job, as the dispatcher does once it recorded
// the send.
func (t *natsTemplates) deliver(ctx context.Context, js jetstream.JetStream, batch []*platform.Delivery) error {
	out := make([]*nats.Msg, 0, len(batch))
	for _, d := range batch {
		id, ok := strings.CutPrefix(d.Headers().Get(jetstream.MsgIDHeader), "dispatch:")
		id, _, found := strings.Cut(id, ":")
		c, issued := t.deliveredCode(id)
		if !ok || !found || !issued {
			return fmt.Errorf("nats-only: stream sequence %d is not a job of this run", d.Meta().Sequence)
		}
		out = append(out, t.as(t.delivered, "delivered", c))
	}
	return platform.PublishAll(ctx, js, out)
}

// benchNATSOnly runs NATS alone with o's requests, rate, tenant, settle and profile.
func benchNATSOnly(ctx context.Context, o *benchOptions, stdout, stderr io.Writer) (err error) {
	progress := func(format string, a ...any) { fmt.Fprintf(stderr, "bench: nats-only: "+format+"\n", a...) }
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if _, _, ok := procUsage(os.Getpid()); !ok {
		return errors.New("-nats-only reads its CPU from /proc, which this system does not have")
	}
	dir, err := os.MkdirTemp("", "otpflow-nats-only-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if o.profile != "" {
		if err := os.MkdirAll(o.profile, 0o755); err != nil {
			return err
		}
	}
	ns, err := startNATS(filepath.Join(dir, "nats"), -1)
	if err != nil {
		return err
	}
	defer func() { ns.Shutdown(); ns.WaitForShutdown() }()
	var conns []*nats.Conn
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	connect := func(name string) (jetstream.JetStream, error) {
		nc, err := nats.Connect(ns.ClientURL(), nats.Name("nats-only-"+name))
		if err != nil {
			return nil, err
		}
		conns = append(conns, nc)
		return jetstream.New(nc, jetstream.WithPublishAsyncTimeout(30*time.Second))
	}
	js, err := connect("app")
	if err != nil {
		return err
	}
	if err := provisionStreams(ctx, js, events.StreamOptions{}, io.Discard); err != nil {
		return err
	}
	tpl, err := newNATSTemplates(o.tenant)
	if err != nil {
		return err
	}

	// The app's reader: otp.issued and otp.delivered from OTP_EVENTS, as the bench reads
	// them; a code is its challenge id, which follows from its request.
	delivered := events.TypeDelivered.Subject(o.tenant)
	var seenMu sync.Mutex
	seen := map[string]int{}
	var read atomic.Int64
	all := make(chan time.Time, 1)
	watch, err := js.OrderedConsumer(ctx, events.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{events.TypeIssued.Subject(o.tenant), delivered},
	})
	if err != nil {
		return fmt.Errorf("read OTP_EVENTS: %w", err)
	}
	cc, err := watch.Consume(func(m jetstream.Msg) {
		read.Add(1)
		if m.Subject() != delivered {
			return
		}
		id := m.Headers().Get(events.HeaderSubject)
		seenMu.Lock()
		defer seenMu.Unlock()
		seen[id]++
		if len(seen) == o.requests && seen[id] == 1 { // once: the set only grows
			all <- time.Now()
		}
	})
	if err != nil {
		return fmt.Errorf("read OTP_EVENTS: %w", err)
	}
	defer cc.Stop()

	stages := natsStagesOf(tpl)
	handled := make([]atomic.Int64, len(stages))
	cons := make([]jetstream.Consumer, len(stages))
	run, stop := context.WithCancel(ctx)
	g, run := errgroup.WithContext(run)
	var profiling sync.WaitGroup
	var stageErr atomic.Pointer[error]
	defer func() { // every goroutine ends before the connections close
		stop()
		if werr := g.Wait(); werr != nil {
			err = werr
		}
		if p := stageErr.Load(); p != nil { // the cause
			err = fmt.Errorf("nats-only: a stage failed: %w", *p)
		}
		profiling.Wait()
	}()
	services := map[string]jetstream.JetStream{}
	for i, st := range stages {
		sjs := services[st.service]
		if sjs == nil {
			if sjs, err = connect(st.service); err != nil {
				return err
			}
			services[st.service] = sjs
		}
		if cons[i], err = sjs.Consumer(ctx, st.stream, st.durable); err != nil {
			return fmt.Errorf("nats-only: consumer %s on %s: %w", st.durable, st.stream, err)
		}
		c := platform.NewConsumer(cons[i], platform.ConsumeConfig{Name: st.durable, BatchSize: st.batch,
			Prefetch: st.prefetch, Linger: st.linger, Ordered: st.ordered, JS: sjs, Log: log})
		g.Go(func() error {
			err := c.Run(run, func(ctx context.Context, batch []*platform.Delivery) error {
				if st.publish != nil {
					if err := st.publish(ctx, sjs, batch); err != nil {
						// The consumer would retry it; a measure with a failing stage
						// measures nothing: end the run with the cause.
						stageErr.CompareAndSwap(nil, &err)
						stop()
						for _, d := range batch {
							d.Settle(platform.Terminate("nats-only: the run ended"))
						}
						return nil
					}
				}
				for _, d := range batch {
					d.Settle(platform.Ack())
				}
				handled[i].Add(int64(len(batch)))
				return nil
			})
			if run.Err() != nil && ctx.Err() == nil {
				return nil // stopped
			}
			return err
		})
	}

	progress("%d requests at %s through %d durable consumers", o.requests, rateText(o.rate), len(stages))
	if o.profile != "" {
		var profileErr error
		profiling.Go(func() {
			profileErr = profileSelf(run, filepath.Join(o.profile, "nats-only.cpu.pprof"), time.Duration(o.profileFor)*time.Second)
		})
		defer func() {
			if err != nil {
				stop() // no need for the profile's seconds
			}
			profiling.Wait()
			if err == nil {
				err = profileErr
			}
		}()
	}
	cpu0, _, ok0 := procUsage(os.Getpid())
	start := time.Now()
	if _, _, err := publishLoad(run, js, o.tenant, randomHex(4)+"n", o.requests, o.rate, nil); err != nil {
		return err
	}

	res := natsOnlyResult{Mode: "nats-only", Requests: o.requests, Cores: runtime.GOMAXPROCS(0), Handled: map[string]int{}}
	// Wait for every code's otp.delivered and then for every durable to have nothing
	// pending or unacknowledged on the server, giving up once nothing moves for o.settle.
	var last time.Time
	progressAt, moved := time.Now(), int64(-1)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	shown := time.Now()
	for {
		if time.Since(shown) >= time.Second {
			seenMu.Lock()
			n := len(seen)
			seenMu.Unlock()
			progress("%5.0fs delivered %d/%d", time.Since(start).Seconds(), n, o.requests)
			shown = time.Now()
		}
		sum := read.Load()
		for i := range handled {
			sum += handled[i].Load()
		}
		if last.IsZero() {
			select {
			case last = <-all:
			default:
			}
		}
		if !last.IsZero() && drained(run, cons) {
			res.Drained = true
			break
		}
		if sum != moved {
			progressAt, moved = time.Now(), sum
		} else if time.Since(progressAt) > o.settle {
			progress("nothing moved for %v; counting the rest as lost", o.settle)
			break
		}
		select {
		case <-run.Done():
			return ctx.Err() // or, deferred, the stage's error
		case <-tick.C:
		}
	}
	cpu1, _, ok1 := procUsage(os.Getpid())
	if !ok0 || !ok1 {
		return errors.New("nats-only: /proc did not give this process's CPU")
	}
	seenMu.Lock()
	for _, n := range seen {
		res.Delivered++
		res.Duplicates += n - 1
	}
	seenMu.Unlock()
	res.Lost = o.requests - res.Delivered
	handedOut := read.Load()
	for i, st := range stages {
		res.Handled[st.stream+"/"+st.durable] = int(handled[i].Load())
		handedOut += handled[i].Load()
	}
	var stored uint64
	names := js.StreamNames(ctx)
	for name := range names.Name() {
		s, err := js.Stream(ctx, name)
		if err != nil {
			return err
		}
		stored += s.CachedInfo().State.LastSeq
	}
	if err := names.Err(); err != nil {
		return err
	}
	res.StoredPerCode = round(float64(stored)/float64(o.requests), 2)
	res.DeliveredPerCode = round(float64(handedOut)/float64(o.requests), 2)
	if !last.IsZero() {
		res.DurationS = round(last.Sub(start).Seconds(), 3)
		res.CodesPerSec = round(float64(o.requests)/last.Sub(start).Seconds(), 1)
	}
	res.CPUSeconds = round(cpu1-cpu0, 2)
	if res.Delivered > 0 && cpu1 > cpu0 {
		res.CPUMSPerCode = round(1000*(cpu1-cpu0)/float64(res.Delivered), 3)
		res.BoxCodesPerSec = round(float64(res.Cores)*1000/res.CPUMSPerCode, 0)
	}
	if o.profile != "" {
		res.Profiles, _ = filepath.Abs(o.profile)
	}
	if o.json {
		return json.NewEncoder(stdout).Encode(res)
	}
	fmt.Fprintf(stdout, "NATS alone: %d codes in %.2f s, %.0f codes/s; %.2f CPU s, %.3f ms a code: %.0f codes/s on %d cores with nothing else\n",
		res.Delivered, res.DurationS, res.CodesPerSec, res.CPUSeconds, res.CPUMSPerCode, res.BoxCodesPerSec, res.Cores)
	fmt.Fprintf(stdout, "lost %d, duplicates %d; %.2f messages stored and %.2f read a code; acknowledged per consumer: %v\n",
		res.Lost, res.Duplicates, res.StoredPerCode, res.DeliveredPerCode, res.Handled)
	return nil
}

// drained says whether every consumer has nothing pending and nothing unacknowledged.
func drained(ctx context.Context, cons []jetstream.Consumer) bool {
	for _, c := range cons {
		info, err := c.Info(ctx)
		if err != nil || info.NumPending > 0 || info.NumAckPending > 0 {
			return false
		}
	}
	return true
}
