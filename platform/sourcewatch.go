package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/prometheus/client_golang/prometheus"
)

// SourceWatch measures, for every tenant request stream OTP_REQUESTS sources
// (OTP_TENANT_STREAMS), how long the oldest request stored there and not yet on
// OTP_REQUESTS has waited. Sourcing takes milliseconds; a request that waits longer sits
// behind one OTP_REQUESTS cannot store, which JetStream retries for as long as that one
// lives, holding back every later request of the tenant, acknowledged to its app and
// unread (deploy/nats/README.md: a raw client can publish such a message). The server's
// own account of a source (its lag, its error) does not show it. The watch reads only
// JetStream: the last copy of the tenant's requests on OTP_REQUESTS names the sequence it
// was sourced from, and the tenant stream's next stored message after it is the oldest
// one waiting. Alert rule TenantRequestsNotSourced reads the gauge.
type SourceWatch struct {
	JS jetstream.JetStream
	// Every is the period of the check (default 15 s).
	Every time.Duration
	Log   *slog.Logger
	// Reg, when set, gets the gauge.
	Reg prometheus.Registerer

	once  sync.Once
	delay *prometheus.GaugeVec
}

// maxSkip bounds the deleted sequences a check steps over to find a tenant stream's next
// stored message.
const maxSkip = 1000

func (w *SourceWatch) init() {
	w.once.Do(func() {
		w.delay = registerOnce(w.Reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "otpflow_tenant_requests_unsourced_age_seconds",
			Help: "How long the oldest request on a tenant's request stream not yet on OTP_REQUESTS has waited; 0 when none, by tenant."},
			[]string{"tenant"}))
		if w.Log == nil {
			w.Log = slog.New(slog.DiscardHandler)
		}
	})
}

// Run checks every Every until ctx ends. A check that fails is logged and tried again at
// the next tick.
func (w *SourceWatch) Run(ctx context.Context) error {
	w.init()
	every := w.Every
	if every <= 0 {
		every = 15 * time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if _, err := w.Check(ctx); err != nil && ctx.Err() == nil {
			w.Log.Warn("tenant request sourcing not checked", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Check measures every tenant stream OTP_REQUESTS sources now, sets the gauge and
// returns the ages by tenant (none when OTP_REQUESTS sources nothing).
func (w *SourceWatch) Check(ctx context.Context) (map[string]time.Duration, error) {
	w.init()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	requests, err := w.JS.Stream(ctx, events.StreamRequests)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", events.StreamRequests, err)
	}
	ages := map[string]time.Duration{}
	var errs []error
	for _, src := range requests.CachedInfo().Config.Sources {
		tenant, ok := strings.CutPrefix(src.Name, events.StreamRequests+"_")
		if !ok || !events.IsRequestsStream(src.Name) {
			continue
		}
		age, err := w.unsourced(ctx, requests, src.Name, tenant)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", src.Name, err))
			continue
		}
		ages[tenant] = age
		w.delay.WithLabelValues(tenant).Set(age.Seconds())
		if age > time.Minute {
			w.Log.Error("requests of a tenant are not reaching OTP_REQUESTS", "tenant", tenant, "stream", src.Name, "oldest_waiting", age)
		}
	}
	return ages, errors.Join(errs...)
}

// unsourced is the age of the oldest message of stream (tenant's) not yet on requests.
func (w *SourceWatch) unsourced(ctx context.Context, requests jetstream.Stream, stream, tenant string) (time.Duration, error) {
	sourced, state, own, err := sourcedThrough(ctx, w.JS, requests, stream, tenant)
	if err != nil {
		return 0, err
	}
	next, err := nextStored(ctx, own, state, sourced)
	if err != nil || next == nil {
		return 0, err
	}
	return max(time.Since(next.Time), 0), nil
}

// nextStored is the first message own (a tenant's request stream in state) still holds
// after sequence sourced, nil when there is none: the oldest one not yet on OTP_REQUESTS.
func nextStored(ctx context.Context, own jetstream.Stream, state jetstream.StreamState, sourced uint64) (*jetstream.RawStreamMsg, error) {
	if state.Msgs == 0 || sourced >= state.LastSeq {
		return nil, nil
	}
	for seq, n := max(sourced+1, state.FirstSeq), 0; seq <= state.LastSeq && n < maxSkip; seq, n = seq+1, n+1 {
		m, err := own.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // deleted (an erasure)
		}
		return m, err
	}
	return nil, nil
}

// sourcedThrough is the sequence of tenant's request stream (named stream) through which
// OTP_REQUESTS has taken its messages, by the source header of the tenant's last copy on
// requests, with the stream's state. A copy older than the stream (a stream deleted and
// made again, whose sequences start over) counts for nothing. Without a copy (none yet,
// or OTP_REQUESTS lost them: a purge) the messages stored after OTP_REQUESTS's last one
// count as not taken.
func sourcedThrough(ctx context.Context, js jetstream.JetStream, requests jetstream.Stream, stream, tenant string) (uint64, jetstream.StreamState, jetstream.Stream, error) {
	own, err := js.Stream(ctx, stream)
	if err != nil {
		return 0, jetstream.StreamState{}, nil, err
	}
	info := own.CachedInfo()
	state := info.State
	last, err := requests.GetLastMsgForSubject(ctx, events.TypeRequested.Subject(tenant))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		// A copy is stored after its original: what the tenant's stream stored after the
		// last message OTP_REQUESTS stored was not taken. Found from the newest back.
		after := requests.CachedInfo().State.LastTime
		if state.Msgs == 0 || !state.LastTime.After(after) {
			return state.LastSeq, state, own, nil
		}
		through := state.LastSeq - 1
		for seq, n := state.LastSeq-1, 0; seq >= state.FirstSeq && seq > 0 && n < maxSkip; seq, n = seq-1, n+1 {
			m, err := own.GetMsg(ctx, seq)
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				continue
			}
			if err != nil {
				return 0, state, own, err
			}
			if !m.Time.After(after) {
				break
			}
			through = seq - 1
		}
		return through, state, own, nil
	case err != nil:
		return 0, state, own, err
	}
	if last.Time.Before(info.Created) {
		return 0, state, own, nil
	}
	if f := strings.Fields(last.Header.Get(events.HeaderStreamSource)); len(f) >= 2 && f[0] == stream {
		n, _ := strconv.ParseUint(f[1], 10, 64)
		return n, state, own, nil
	}
	return 0, state, own, nil
}

// inTransitGrace is how long AwaitSourced allows a message deleted from a tenant's
// stream to have been on its way to OTP_REQUESTS already (a copy in transit takes
// milliseconds: sourcing runs inside the server).
const inTransitGrace = 2 * time.Second

// AwaitSourced waits until OTP_REQUESTS has taken every message tenant's request stream
// held up to sequence through (the ones deleted meanwhile aside), or ctx ends: for an
// erasure, which deletes from the tenant's stream first and must also find on
// OTP_REQUESTS the copies that were in transit.
func AwaitSourced(ctx context.Context, js jetstream.JetStream, tenant string, through uint64) error {
	start := time.Now()
	for {
		requests, err := js.Stream(ctx, events.StreamRequests)
		if err != nil {
			return err
		}
		var next *jetstream.RawStreamMsg
		sourced, state, own, err := sourcedThrough(ctx, js, requests, events.TenantRequestsStream(tenant), tenant)
		if err == nil && sourced >= through {
			return nil
		}
		if err == nil {
			next, err = nextStored(ctx, own, state, sourced)
		}
		// Only deleted messages left before through: one may have been on its way when it
		// was deleted; give it the grace, then take it as never sent.
		if err == nil && (next == nil || next.Sequence > through) && time.Since(start) > inTransitGrace {
			return nil
		}
		select {
		case <-ctx.Done():
			if err == nil && next != nil {
				err = fmt.Errorf("sequence %d of %s not on %s yet", next.Sequence, events.TenantRequestsStream(tenant), events.StreamRequests)
			}
			return errors.Join(err, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
