package platform

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// The issuer reads OTP_REQUESTS through one durable, or through one per tenant when
// tenants have request streams of their own (events.IssuerConsumers). Turning tenant
// streams on or off, or adding a tenant, changes that set: provisioning creates the new
// durables where the ones they take over from left off, so that nothing unread is
// skipped and an hour of requests already answered is not read again (each would be
// refused as stale), and deletes a durable the contract no longer names only once the
// new ones exist and would read everything it had not.

// issuerSet is the issuer's durables on OTP_REQUESTS as the server holds them, by name.
type issuerSet map[string]*jetstream.ConsumerInfo

func issuerDurables(ctx context.Context, js jetstream.JetStream) (issuerSet, error) {
	set := issuerSet{}
	err := untilAnswered(ctx, func(ctx context.Context) error {
		clear(set)
		st, err := js.Stream(ctx, events.StreamRequests)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		list := st.ListConsumers(ctx)
		for info := range list.Info() {
			if events.IsIssuerConsumer(info.Name) {
				set[info.Name] = info
			}
		}
		return list.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("the issuer's consumers on %s: %w", events.StreamRequests, err)
	}
	return set, nil
}

// startFor is where a new durable of the issuer, sc, starts on OTP_REQUESTS: the lowest
// sequence one of the issuer's durables has not acknowledged, or 0 (the stream's start)
// when it has none yet or that is the first sequence. Earlier requests were answered.
// Later ones that one durable acknowledged out of order are read again and recognised
// (a challenge's request id, a resend's message identity), as after any redelivery.
func (s issuerSet) startFor(sc events.StreamConsumer) uint64 {
	if sc.Stream != events.StreamRequests || !events.IsIssuerConsumer(sc.Config.Durable) || len(s) == 0 {
		return 0
	}
	var start uint64
	for _, info := range s {
		if next := info.AckFloor.Stream + 1; start == 0 || next < start {
			start = next
		}
	}
	if start <= 1 {
		return 0
	}
	return start
}

// retire lists the issuer's durables o no longer names, to delete. One that still has
// requests to read must leave none that the durables o names would not read (a tenant
// taken off OTP_TENANT_STREAMS whose requests are still on OTP_REQUESTS): the plan is
// refused, naming the tenants.
func (s issuerSet) retire(ctx context.Context, js jetstream.JetStream, o events.StreamOptions) ([]Change, error) {
	wanted := events.IssuerConsumers(o.Tenants)
	names := make([]string, len(wanted))
	for i, w := range wanted {
		names[i] = w.Durable
	}
	var out []Change
	for _, name := range sortedKeys(s) {
		if slices.Contains(names, name) {
			continue
		}
		info := s[name]
		if info.NumPending > 0 || info.NumAckPending > 0 {
			left, err := s.unread(ctx, js, info, wanted)
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
// none of wanted would read: wanted reads a subject its filter takes, if it is new (it
// starts no later than info, startFor) or has acknowledged no further than info.
func (s issuerSet) unread(ctx context.Context, js jetstream.JetStream, info *jetstream.ConsumerInfo, wanted []jetstream.ConsumerConfig) ([]string, error) {
	from := info.AckFloor.Stream + 1
	reads := func(subject string) bool {
		return slices.ContainsFunc(wanted, func(w jetstream.ConsumerConfig) bool {
			have, exists := s[w.Durable]
			return SubjectMatches(w.FilterSubject, subject) && (!exists || have.AckFloor.Stream+1 <= from)
		})
	}
	var left []string
	err := untilAnswered(ctx, func(ctx context.Context) error {
		left = left[:0]
		st, err := js.Stream(ctx, events.StreamRequests)
		if err != nil {
			return err
		}
		// A durable without a filter reads every request.
		si, err := st.Info(ctx, jetstream.WithSubjectFilter(cmp.Or(info.Config.FilterSubject, events.TypeRequested.Wildcard())))
		if err != nil {
			return err
		}
		for _, subject := range sortedKeys(si.State.Subjects) {
			if reads(subject) {
				continue
			}
			_, err := st.GetMsg(ctx, from, jetstream.WithGetMsgSubject(subject))
			switch {
			case errors.Is(err, jetstream.ErrMsgNotFound):
			case err != nil:
				return err
			default:
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

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// IssuerConsumersNow are the issuer's durables as OTP_REQUESTS is provisioned now:
// events.IssuerConsumers of the tenants whose request streams it sources. The issuer
// reads them from the server, not from its own settings, so that it reads what
// provisioning made; a missing OTP_REQUESTS is a *MissingError.
func IssuerConsumersNow(ctx context.Context, js jetstream.JetStream) ([]jetstream.ConsumerConfig, error) {
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
