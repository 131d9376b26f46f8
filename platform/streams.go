package platform

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// Provisioning is apart from serving. Provision (otpflow provision, under an admin
// identity) creates or updates the contract's streams and durable consumers, which events
// declares as data; a service only binds to what exists (Bind), so it needs no right to
// create or change a stream or a consumer.

// setupTimeout bounds one setup step at start: provisioning, binding a consumer.
const setupTimeout = 30 * time.Second

// MissingError is a stream or consumer a service binds to that does not exist: one line,
// naming it and the command that makes it.
type MissingError struct {
	Stream, Consumer string
}

func (e *MissingError) Error() string {
	if e.Consumer == "" {
		return fmt.Sprintf("stream %s does not exist: run otpflow provision", e.Stream)
	}
	return fmt.Sprintf("consumer %s on stream %s does not exist: run otpflow provision", e.Consumer, e.Stream)
}

// Bind is how a service starts on JetStream: its durable consumer cc.Durable on stream,
// as provisioning made it, within the setup timeout. A stream or consumer that does not
// exist is a *MissingError; Bind creates nothing.
func Bind(ctx context.Context, js jetstream.JetStream, stream string, cc jetstream.ConsumerConfig) (jetstream.Consumer, error) {
	setup, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	var cons jetstream.Consumer
	err := untilAnswered(setup, func(ctx context.Context) error {
		var err error
		cons, err = js.Consumer(ctx, stream, cc.Durable)
		switch {
		case errors.Is(err, jetstream.ErrStreamNotFound):
			return backoff.Permanent(&MissingError{Stream: stream})
		case errors.Is(err, jetstream.ErrConsumerNotFound):
			return backoff.Permanent(&MissingError{Stream: stream, Consumer: cc.Durable})
		}
		return err
	})
	var missing *MissingError
	if errors.As(err, &missing) {
		return nil, missing
	}
	if err != nil {
		return nil, fmt.Errorf("bind consumer %s on %s: %w", cc.Durable, stream, err)
	}
	// What the consumer reads and how it is acknowledged must be the contract's: a filter
	// or a push subject changed by hand would have the service miss messages, or hand
	// them elsewhere, without a word.
	if info := cons.CachedInfo(); info != nil {
		var wrong []string
		for _, f := range differ(info.Config, startedAt(stream, info.Config, cc)) {
			if bindChecked[f.Name] {
				wrong = append(wrong, fmt.Sprintf("%s %s, the contract's %s", f.Name, f.Have, f.Want))
			}
		}
		if len(wrong) > 0 {
			return nil, fmt.Errorf("consumer %s on stream %s differs from the contract (%s): run otpflow provision",
				cc.Durable, stream, strings.Join(wrong, "; "))
		}
	}
	return cons, nil
}

// bindChecked are the consumer fields a service refuses to bind with when they differ from
// the contract's; the rest (limits, timeouts, MaxDeliver) a deployment may tune.
var bindChecked = map[string]bool{"filter_subject": true, "filter_subjects": true, "ack_policy": true,
	"deliver_subject": true, "deliver_group": true, "deliver_policy": true, "durable_name": true}

// startedAt is want, one of the issuer's durables on OTP_REQUESTS, which the contract
// has read the stream from its start, as provisioning created it from a sequence when it
// took over from the issuer's other durables (issuerSet.startFor), marked with
// MetadataStartSeq: where a durable starts is fixed when it is made, and that start is
// not drift. Every other consumer, and one started elsewhere by hand, must start where
// the contract says.
func startedAt(stream string, have, want jetstream.ConsumerConfig) jetstream.ConsumerConfig {
	if stream == events.StreamRequests && events.IsIssuerConsumer(want.Durable) && have.Metadata[MetadataStartSeq] != "" &&
		want.DeliverPolicy == jetstream.DeliverAllPolicy && have.DeliverPolicy == jetstream.DeliverByStartSequencePolicy {
		want.DeliverPolicy, want.OptStartSeq = have.DeliverPolicy, have.OptStartSeq
	}
	return want
}

// Change is one difference between the contract and the server: a stream or consumer to
// create, or fields to update (old and new values, as JSON), or a consumer to delete.
type Change struct {
	Stream, Consumer string // Consumer is empty for a stream
	Create           bool
	// StartSeq is the stream sequence an issuer durable starts at: on one to create, its
	// subjects' first request not yet read (issuerSet.startFor); on one to update, the
	// start it was made with, which the update keeps. Zero: the stream's start.
	StartSeq uint64
	// Delete removes the consumer; Replaced names the durables that read what it read.
	Delete   bool
	Replaced []string
	Fields   []FieldChange
}

// FieldChange is one field of a config that differs.
type FieldChange struct {
	Name, Have, Want string
}

func (c Change) String() string {
	what := "stream " + c.Stream
	if c.Consumer != "" {
		what = "consumer " + c.Consumer + " on " + c.Stream
	}
	switch {
	case c.Create && c.StartSeq > 0:
		return fmt.Sprintf("create %s from sequence %d, its subjects' first request not yet read", what, c.StartSeq)
	case c.Create:
		return "create " + what
	case c.Delete:
		return "delete " + what + " (read by " + strings.Join(c.Replaced, ", ") + " instead)"
	}
	parts := make([]string, len(c.Fields))
	for i, f := range c.Fields {
		parts[i] = fmt.Sprintf("%s %s -> %s", f.Name, f.Have, f.Want)
	}
	return "update " + what + ": " + strings.Join(parts, ", ")
}

// Plan compares the contract's streams and consumers (events.StreamConfigs,
// events.ConsumerConfigs) with what the server holds, and returns what Provision would
// change, in order: every stream before the consumers.
func Plan(ctx context.Context, js jetstream.JetStream, o events.StreamOptions) ([]Change, error) {
	if err := checkTenantStreams(ctx, js, o); err != nil {
		return nil, err
	}
	var changes []Change
	for _, want := range events.StreamConfigs(o) {
		var info *jetstream.StreamInfo
		err := untilAnswered(ctx, func(ctx context.Context) error {
			st, err := js.Stream(ctx, want.Name)
			if errors.Is(err, jetstream.ErrStreamNotFound) {
				info = nil
				return nil
			}
			if err != nil {
				return err
			}
			info = st.CachedInfo()
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("stream %s: %w", want.Name, err)
		}
		if info == nil {
			changes = append(changes, Change{Stream: want.Name, Create: true})
		} else if fields := differ(info.Config, want); len(fields) > 0 {
			changes = append(changes, Change{Stream: want.Name, Fields: fields})
		}
	}
	issuers, err := issuerDurables(ctx, js)
	if err != nil {
		return nil, err
	}
	starts := map[string]uint64{}
	for _, sc := range events.ConsumerConfigs(o) {
		var info *jetstream.ConsumerInfo
		err := untilAnswered(ctx, func(ctx context.Context) error {
			c, err := js.Consumer(ctx, sc.Stream, sc.Config.Durable)
			if errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) {
				info = nil
				return nil
			}
			if err != nil {
				return err
			}
			info = c.CachedInfo()
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("consumer %s on %s: %w", sc.Config.Durable, sc.Stream, err)
		}
		if info == nil {
			start, err := issuers.startFor(ctx, js, sc)
			if err != nil {
				return nil, err
			}
			starts[sc.Config.Durable] = start
			changes = append(changes, Change{Stream: sc.Stream, Consumer: sc.Config.Durable, Create: true, StartSeq: start})
			continue
		}
		// An update keeps where the durable was made to start: the server cannot change
		// that, and refuses an update that tries.
		want := startedAt(sc.Stream, info.Config, sc.Config)
		if fields := differ(info.Config, want); len(fields) > 0 {
			var keep uint64
			if want.DeliverPolicy == jetstream.DeliverByStartSequencePolicy {
				keep = want.OptStartSeq
			}
			changes = append(changes, Change{Stream: sc.Stream, Consumer: sc.Config.Durable, Fields: fields, StartSeq: keep})
		}
	}
	gone, err := issuers.retire(ctx, js, o, starts)
	if err != nil {
		return nil, err
	}
	return append(changes, gone...), nil
}

// differ lists the fields of a config whose value on the server differs from the
// contract's, over every field either side sets: a field the contract leaves unset must be
// unset (or the server's default, serverDefaults) on the server too, so a limit, a
// republish, a mirror or a filter added by hand is drift like any other. Fields the server
// manages itself (serverManaged) are not compared.
func differ(have, want any) []FieldChange {
	var h, w map[string]any
	hb, _ := json.Marshal(have)
	wb, _ := json.Marshal(want)
	_ = json.Unmarshal(hb, &h)
	_ = json.Unmarshal(wb, &w)
	names := map[string]bool{}
	for k := range w {
		names[k] = true
	}
	for k := range h {
		names[k] = true
	}
	sorted := make([]string, 0, len(names))
	for k := range names {
		if !serverManaged[k] {
			sorted = append(sorted, k)
		}
	}
	slices.Sort(sorted)
	var out []FieldChange
	for _, k := range sorted {
		hv, wv := normal(k, h[k]), normal(k, w[k])
		if !reflect.DeepEqual(hv, wv) {
			hj, _ := json.Marshal(h[k])
			wj, _ := json.Marshal(w[k])
			out = append(out, FieldChange{Name: k, Have: string(hj), Want: string(wj)})
		}
	}
	return out
}

// serverManaged are config fields the server sets or fills on its own.
var serverManaged = map[string]bool{"metadata": true, "created": true, "name": true}

// serverDefaults are the values the server writes for a field left unset: an unset field
// and its default are the same setting.
var serverDefaults = map[string]any{
	"max_consumers": -1.0, "max_msgs": -1.0, "max_bytes": -1.0, "max_msgs_per_subject": -1.0, "max_msg_size": -1.0,
	"max_waiting": 512.0, "max_ack_pending": 1000.0, "num_replicas": 1.0,
}

// normal is v with the server's default for field k, and every zero value, read as unset.
func normal(k string, v any) any {
	if d, ok := serverDefaults[k]; ok && reflect.DeepEqual(v, d) {
		return nil
	}
	if zero(v) {
		return nil
	}
	return v
}

// Provision creates or updates the contract's streams and durable consumers to match it,
// and returns what it changed (nothing when all matched). It is idempotent. It waits for a
// cluster that has not elected its leaders yet, within ctx.
func Provision(ctx context.Context, js jetstream.JetStream, o events.StreamOptions) ([]Change, error) {
	changes, err := Plan(ctx, js, o)
	if err != nil {
		return nil, err
	}
	changed := func(name string, create bool) bool {
		return slices.ContainsFunc(changes, func(c Change) bool { return c.Consumer == "" && c.Stream == name && (c.Create || !create) })
	}
	put := func(cfg jetstream.StreamConfig) error {
		if err := untilAnswered(ctx, func(ctx context.Context) error {
			_, err := js.CreateOrUpdateStream(ctx, cfg)
			return err
		}); err != nil {
			return fmt.Errorf("provision stream %s: %w", cfg.Name, err)
		}
		return nil
	}
	// New tenant request streams first, capturing nothing of the contract yet: the
	// server sets each one's MaxBytes aside when it makes it, and one it has no room for
	// must fail while OTP_REQUESTS still captures every tenant's requests, not after it
	// stopped (two streams may not capture one subject, so OTP_REQUESTS lets go of
	// otp.requested.* before the tenant streams take their own).
	for _, cfg := range events.StreamConfigs(o) {
		if events.IsRequestsStream(cfg.Name) && cfg.Name != events.StreamRequests && changed(cfg.Name, true) {
			staged := cfg
			staged.Subjects = []string{"_otpflow.staged." + cfg.Name}
			if err := put(staged); err != nil {
				return nil, err
			}
		}
	}
	for _, cfg := range events.StreamConfigs(o) {
		if changed(cfg.Name, false) {
			if err := put(cfg); err != nil {
				return nil, err
			}
		}
	}
	for _, sc := range events.ConsumerConfigs(o) {
		i := slices.IndexFunc(changes, func(c Change) bool { return c.Consumer == sc.Config.Durable && c.Stream == sc.Stream })
		if i < 0 {
			continue
		}
		cfg := sc.Config
		if start := changes[i].StartSeq; start > 0 {
			cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, start
			cfg.Metadata = map[string]string{MetadataStartSeq: strconv.FormatUint(start, 10)}
		}
		if _, err := EnsureConsumer(ctx, js, sc.Stream, cfg); err != nil {
			return nil, fmt.Errorf("provision %w", err)
		}
	}
	// Last, once the durables that take over exist: the issuer's durables the plan
	// retires, looked at again now (a request of a tenant no durable will read may have
	// landed while the streams changed).
	if !slices.ContainsFunc(changes, func(c Change) bool { return c.Delete }) {
		return changes, nil
	}
	issuers, err := issuerDurables(ctx, js)
	if err != nil {
		return nil, fmt.Errorf("provision: %w", err)
	}
	gone, err := issuers.retire(ctx, js, o, nil)
	if err != nil {
		return nil, fmt.Errorf("provision: %w", err)
	}
	for _, c := range gone {
		err := untilAnswered(ctx, func(ctx context.Context) error {
			err := js.DeleteConsumer(ctx, c.Stream, c.Consumer)
			if errors.Is(err, jetstream.ErrConsumerNotFound) {
				return nil
			}
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("provision: delete consumer %s on %s: %w", c.Consumer, c.Stream, err)
		}
	}
	return changes, nil
}

// EnsureConsumer creates or updates a durable consumer on stream, e.g.
// events.IssuerConsumer on events.StreamRequests. Provisioning uses it; so do tests that
// tune a consumer.
func EnsureConsumer(ctx context.Context, js jetstream.JetStream, stream string, cfg jetstream.ConsumerConfig) (jetstream.Consumer, error) {
	var cons jetstream.Consumer
	err := untilAnswered(ctx, func(ctx context.Context) error {
		var err error
		cons, err = js.CreateOrUpdateConsumer(ctx, stream, cfg)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("consumer %s on %s: %w", cfg.Durable, stream, err)
	}
	return cons, nil
}

// untilAnswered retries a JetStream API call, each with a short timeout, until the server
// answers it or ctx ends: a call sent before a cluster has elected its meta leader may
// never be answered, or be answered 503. Any other answer (e.g. a config the server
// refuses) ends the retries, as does an error the call marks backoff.Permanent.
func untilAnswered(ctx context.Context, call func(context.Context) error) error {
	b := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(2*time.Second), backoff.WithMaxElapsedTime(0))
	var last error
	err := backoff.Retry(func() error {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		last = call(callCtx)
		var apiErr *jetstream.APIError
		if errors.As(last, &apiErr) && apiErr.Code != 503 {
			return backoff.Permanent(last)
		}
		return last
	}, backoff.WithContext(b, ctx))
	if err != nil && ctx.Err() != nil && last != nil && !errors.Is(last, ctx.Err()) {
		return errors.Join(last, ctx.Err()) // why it kept failing, and why it stopped
	}
	return err
}

// zero reports whether a JSON value is the zero of its type.
func zero(v any) bool {
	switch v := v.(type) {
	case nil:
		return true
	case bool:
		return !v
	case float64:
		return v == 0
	case string:
		return v == ""
	case []any:
		return len(v) == 0
	case map[string]any:
		return len(v) == 0
	}
	return false
}

// checkTenantStreams refuses a plan that would leave a tenant's request stream
// (events.TenantRequestsStream) on the server that OTP_REQUESTS no longer sources: it
// would keep taking that tenant's requests, acknowledged, and nothing would read them.
// Taking a tenant off OTP_TENANT_STREAMS (or turning tenant streams off) means deleting
// its stream once OTP_REQUESTS holds what it held.
func checkTenantStreams(ctx context.Context, js jetstream.JetStream, o events.StreamOptions) error {
	want := map[string]bool{}
	for _, cfg := range events.StreamConfigs(o) {
		want[cfg.Name] = true
	}
	var left []string
	err := untilAnswered(ctx, func(ctx context.Context) error {
		left = left[:0]
		names := js.StreamNames(ctx)
		for name := range names.Name() {
			if events.IsRequestsStream(name) && !want[name] {
				left = append(left, name)
			}
		}
		return names.Err()
	})
	if err != nil {
		return fmt.Errorf("list streams: %w", err)
	}
	if len(left) > 0 {
		slices.Sort(left)
		return fmt.Errorf("%s would take requests that OTP_REQUESTS no longer sources (OTP_TENANT_STREAMS does not name their tenants): add the tenants back, or delete each stream once OTP_REQUESTS holds what it held",
			strings.Join(left, ", "))
	}
	return nil
}
