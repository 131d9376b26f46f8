package platform

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// The issuer reads OTP_REQUESTS through one durable, or through one per tenant when
// tenants have request streams of their own (events.IssuerConsumers). Turning tenant
// streams on or off, or adding a tenant, changes that set: provisioning creates each new
// durable at its subjects' first request not yet read (issuerSet.startFor), so that
// nothing unread is skipped and, where a durable can say how far it read, what it
// answered is not read again (a request answered an hour ago would now be refused as
// stale), and deletes a durable the contract no longer names only once the new ones
// exist and would read everything it had not. Names of the form issuer_<tenant> on
// OTP_REQUESTS are the issuer's: provisioning deletes one that the contract does not
// name.

// MetadataStartSeq is the consumer metadata key with which provisioning marks an
// issuer durable it created at a sequence (issuerSet.startFor): the one start other than
// the stream's start that a service binds to (startedAt).
const MetadataStartSeq = "otpflow.start_seq"

// issuerSet is the issuer's durables on OTP_REQUESTS as the server holds them, by name,
// and the stream's last sequence, read before them.
type issuerSet struct {
	durables map[string]*jetstream.ConsumerInfo
	lastSeq  uint64
}

func issuerDurables(ctx context.Context, js jetstream.JetStream) (*issuerSet, error) {
	set := &issuerSet{durables: map[string]*jetstream.ConsumerInfo{}}
	err := untilAnswered(ctx, func(ctx context.Context) error {
		clear(set.durables)
		set.lastSeq = 0
		st, err := js.Stream(ctx, events.StreamRequests)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		set.lastSeq = st.CachedInfo().State.LastSeq
		list := st.ListConsumers(ctx)
		for info := range list.Info() {
			if events.IsIssuerConsumer(info.Name) {
				set.durables[info.Name] = info
			}
		}
		return list.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("the issuer's consumers on %s: %w", events.StreamRequests, err)
	}
	return set, nil
}

// filterOf is the subjects durable cfg reads: its filter, or every request.
func filterOf(cfg jetstream.ConsumerConfig) string {
	return cmp.Or(cfg.FilterSubject, events.TypeRequested.Wildcard())
}

// position is the first sequence durable info has not read: past its acknowledgement
// floor, or, when it has nothing pending and nothing unacknowledged, past the stream's
// last message as it was before info was read, so that an idle tenant's durable, whose
// floor stays at its own last request, does not hold a takeover back.
func (s *issuerSet) position(info *jetstream.ConsumerInfo) uint64 {
	if info.NumPending == 0 && info.NumAckPending == 0 {
		return max(info.AckFloor.Stream, s.lastSeq) + 1
	}
	return info.AckFloor.Stream + 1
}

// startFor is where a new durable of the issuer, sc, starts on OTP_REQUESTS: the stream's
// start (0) when the issuer has no durable at all (a new deployment, or one whose
// durables were deleted by hand: what they answered is not known); else the lowest first
// unread request over the subjects sc takes that the stream holds: for a subject some
// existing durables take, the lowest of their positions; for one none takes, its first
// message (nobody read it). Requests before the start were answered. Later ones a durable
// acknowledged out of order, or answered while provisioning ran, are read again and
// recognised (a challenge's request id, a resend's message identity), as after any
// redelivery; the issuer decides one request at a time (store.issueBatch).
func (s *issuerSet) startFor(ctx context.Context, js jetstream.JetStream, sc events.StreamConsumer) (uint64, error) {
	if sc.Stream != events.StreamRequests || !events.IsIssuerConsumer(sc.Config.Durable) || len(s.durables) == 0 {
		return 0, nil
	}
	start := s.lastSeq + 1
	err := untilAnswered(ctx, func(ctx context.Context) error {
		start = s.lastSeq + 1
		st, err := js.Stream(ctx, events.StreamRequests)
		if err != nil {
			return err
		}
		si, err := st.Info(ctx, jetstream.WithSubjectFilter(filterOf(sc.Config)))
		if err != nil {
			return err
		}
		for _, subject := range slices.Sorted(maps.Keys(si.State.Subjects)) {
			var first uint64
			for _, info := range s.durables {
				if SubjectMatches(filterOf(info.Config), subject) {
					if p := s.position(info); first == 0 || p < first {
						first = p
					}
				}
			}
			if first == 0 {
				m, err := st.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(subject))
				if errors.Is(err, jetstream.ErrMsgNotFound) {
					continue
				}
				if err != nil {
					return err
				}
				first = m.Sequence
			}
			start = min(start, first)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("where consumer %s on %s starts: %w", sc.Config.Durable, events.StreamRequests, err)
	}
	if start <= 1 {
		return 0, nil
	}
	return start, nil
}

// configuredStart is the first sequence durable cfg was made to read from; for a start
// that names no sequence (new messages, a time), none it is known to read.
func configuredStart(cfg jetstream.ConsumerConfig) uint64 {
	switch cfg.DeliverPolicy {
	case jetstream.DeliverAllPolicy:
		return 1
	case jetstream.DeliverByStartSequencePolicy:
		return cfg.OptStartSeq
	}
	return math.MaxUint64
}

// retire lists the issuer's durables o no longer names, to delete. One that still has
// requests to read must leave none that the durables o names would not read (a tenant
// taken off OTP_TENANT_STREAMS whose requests are still on OTP_REQUESTS): the plan is
// refused, naming their subjects. starts are the start sequences of the durables the plan
// creates (0: the stream's start).
func (s *issuerSet) retire(ctx context.Context, js jetstream.JetStream, o events.StreamOptions, starts map[string]uint64) ([]Change, error) {
	wanted := events.IssuerConsumers(o.Tenants)
	names := make([]string, len(wanted))
	for i, w := range wanted {
		names[i] = w.Durable
	}
	var out []Change
	for _, name := range slices.Sorted(maps.Keys(s.durables)) {
		if slices.Contains(names, name) {
			continue
		}
		info := s.durables[name]
		if info.NumPending > 0 || info.NumAckPending > 0 {
			left, err := s.unread(ctx, js, info, wanted, starts)
			if err != nil {
				return nil, err
			}
			if len(left) > 0 {
				return nil, fmt.Errorf("consumer %s on %s has requests of %s still to read, which no consumer of the plan would read: add the tenants back to OTP_TENANT_STREAMS, or provision once it has read them",
					name, events.StreamRequests, strings.Join(left, ", "))
			}
		}
		out = append(out, Change{Stream: events.StreamRequests, Consumer: name, Delete: true, Replaced: names})
	}
	return out, nil
}

// unread lists the subjects of requests that durable info has not acknowledged and that
// none of wanted would read: a wanted durable reads a subject its filter takes if it
// starts no later than the first such request (one the plan creates at its start in
// starts; one that exists where it was made to start, wherever it has got to).
func (s *issuerSet) unread(ctx context.Context, js jetstream.JetStream, info *jetstream.ConsumerInfo, wanted []jetstream.ConsumerConfig, starts map[string]uint64) ([]string, error) {
	from := info.AckFloor.Stream + 1
	reads := func(subject string, seq uint64) bool {
		return slices.ContainsFunc(wanted, func(w jetstream.ConsumerConfig) bool {
			if !SubjectMatches(filterOf(w), subject) {
				return false
			}
			if have, ok := s.durables[w.Durable]; ok {
				return configuredStart(have.Config) <= seq
			}
			return max(starts[w.Durable], 1) <= seq
		})
	}
	var left []string
	err := untilAnswered(ctx, func(ctx context.Context) error {
		left = left[:0]
		st, err := js.Stream(ctx, events.StreamRequests)
		if err != nil {
			return err
		}
		si, err := st.Info(ctx, jetstream.WithSubjectFilter(filterOf(info.Config)))
		if err != nil {
			return err
		}
		for _, subject := range slices.Sorted(maps.Keys(si.State.Subjects)) {
			m, err := st.GetMsg(ctx, from, jetstream.WithGetMsgSubject(subject))
			switch {
			case errors.Is(err, jetstream.ErrMsgNotFound):
			case err != nil:
				return err
			case !reads(subject, m.Sequence):
				left = append(left, subject)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("what consumer %s on %s has still to read: %w", info.Name, events.StreamRequests, err)
	}
	return left, nil
}

// SubjectMatches reports whether NATS subject filter (tokens, '*' for one, '>' for the
// rest) takes subject.
func SubjectMatches(filter, subject string) bool {
	if filter == "" {
		return true
	}
	f, s := strings.Split(filter, "."), strings.Split(subject, ".")
	for i, tok := range f {
		switch {
		case tok == ">":
			return len(s) > i
		case i >= len(s):
			return false
		case tok != "*" && tok != s[i]:
			return false
		}
	}
	return len(f) == len(s)
}

// IssuerConsumersNow are the issuer's durables as OTP_REQUESTS is provisioned now:
// events.IssuerConsumers of the tenants whose request streams it sources. The issuer
// reads them from the server, not from its own settings, so that it reads what
// provisioning made; a missing OTP_REQUESTS is a *MissingError. It waits for NATS at
// most the setup timeout.
func IssuerConsumersNow(ctx context.Context, js jetstream.JetStream) ([]jetstream.ConsumerConfig, error) {
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	var tenants []string
	err := untilAnswered(ctx, func(ctx context.Context) error {
		st, err := js.Stream(ctx, events.StreamRequests)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return backoff.Permanent(&MissingError{Stream: events.StreamRequests})
		}
		if err != nil {
			return err
		}
		tenants = tenants[:0]
		for _, src := range st.CachedInfo().Config.Sources {
			if t, ok := strings.CutPrefix(src.Name, events.StreamRequests+"_"); ok && events.IsRequestsStream(src.Name) {
				tenants = append(tenants, t)
			}
		}
		return nil
	})
	var missing *MissingError
	if errors.As(err, &missing) {
		return nil, missing
	}
	if err != nil {
		return nil, fmt.Errorf("the tenants %s sources: %w", events.StreamRequests, err)
	}
	return events.IssuerConsumers(tenants), nil
}

// IssuerLeftovers are the issuer's durables on OTP_REQUESTS that exist and that want
// (what OTP_REQUESTS is provisioned with now) does not name: the ones provisioning is
// taking the issuer off, which it deletes once they hold nothing unread that no other
// durable reads. The issuer reads them until then.
func IssuerLeftovers(ctx context.Context, js jetstream.JetStream, want []jetstream.ConsumerConfig) ([]jetstream.ConsumerConfig, error) {
	// One try, bounded: without the permission to list (a NATS configuration older than
	// this release), a refused request is only timed out, and the caller goes on with
	// the durables it is provisioned with.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var names []string
	st, err := js.Stream(ctx, events.StreamRequests)
	if err == nil {
		list := st.ConsumerNames(ctx)
		for name := range list.Name() {
			names = append(names, name)
		}
		err = list.Err()
	}
	if err != nil {
		return nil, fmt.Errorf("the consumers on %s: %w", events.StreamRequests, err)
	}
	slices.Sort(names)
	var out []jetstream.ConsumerConfig
	for _, name := range names {
		if slices.ContainsFunc(want, func(cc jetstream.ConsumerConfig) bool { return cc.Durable == name }) {
			continue
		}
		if name == events.ConsumerIssuer {
			out = append(out, events.IssuerConsumer)
		} else if t, ok := strings.CutPrefix(name, events.ConsumerIssuer+"_"); ok && events.ValidTenant(t) {
			out = append(out, events.IssuerTenantConsumer(t))
		}
	}
	return out, nil
}
