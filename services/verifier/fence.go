package verifier

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// What a verify reads of the projection must not be older than what OTP_CHALLENGES held
// when the verify came.
//
//   - A verify for a request the projection does not know waits until the projection has
//     passed the tenant's last otp.challenge (read-your-writes: an app may verify the
//     moment its code is mailed): the fence.
//   - A verify of a challenge whose otp.challenge_superseded is on the stream answers
//     superseded, whether or not the projection has applied it: each verify group reads
//     the tenant's supersessions the projection may not have applied yet (those past its
//     acknowledgement floor) from the stream (the supersession index). Nothing waits for
//     the projection, so a projection held up by any event does not hold up verifies.
//     The issuer publishes a supersession, and the newer code's otp.challenge, before the
//     job that mails the newer code (outbox.Outbox.First), so once the newer code can
//     have been mailed the older one no longer verifies.
//
// Both read the stream's leader (the stream does not allow direct gets), so they are
// read-after-write coherent on a replicated stream too. The projection acknowledges an
// event once its batch is committed, so what is at or below the floor is in the
// database a verify's transaction reads, or was refused by the projection (dead-lettered
// as malformed, or naming another request's challenge).

// errSupersessionsUnknown: the stream could not be read for the tenant's supersessions,
// so a verify that would succeed fails (nothing of it is written; the app asks again).
var errSupersessionsUnknown = errors.New("the supersessions on " + events.StreamChallenges + " could not be read")

// fenceRead is how often verifies waiting in the fence see the projection's floor.
const fenceRead = 5 * time.Millisecond

// floorWatch follows the acknowledgement floor of the challenge projection's durable:
// one read of the consumer's info at a time, shared by every verify that needs it.
type floorWatch struct {
	read func(context.Context) (uint64, error)
	// reading is held while the floor is read, so reads are one at a time and the floor
	// is always the latest read's.
	reading sync.Mutex

	mu      sync.Mutex
	floor   uint64
	readAt  time.Time
	err     error
	waiters int
	polling bool
	// moved is closed after each read of the poller, and replaced.
	moved chan struct{}
}

func newFloorWatch(read func(context.Context) (uint64, error)) *floorWatch {
	return &floorWatch{read: read, moved: make(chan struct{})}
}

// recent is the floor as read at most age ago, read now if it was not.
func (w *floorWatch) recent(ctx context.Context, age time.Duration) (uint64, error) {
	w.reading.Lock()
	defer w.reading.Unlock()
	w.mu.Lock()
	floor, fresh := w.floor, !w.readAt.IsZero() && time.Since(w.readAt) <= age && w.err == nil
	w.mu.Unlock()
	if fresh {
		return floor, nil
	}
	return w.readNow(ctx)
}

// readNow reads the floor; w.reading must be held.
func (w *floorWatch) readNow(ctx context.Context) (uint64, error) {
	floor, err := w.read(ctx)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.err = err
	if err != nil {
		return 0, err
	}
	// The latest read, not the highest: a durable made again starts over.
	w.floor, w.readAt = floor, time.Now()
	return floor, nil
}

// wait returns once the floor is at seq or past it, or with ctx's error (and the last
// read's, if it failed). One poller reads the floor while anyone waits.
func (w *floorWatch) wait(ctx context.Context, seq uint64) error {
	w.mu.Lock()
	if w.floor >= seq && w.err == nil {
		// A floor, once read, stays true: the durable has acknowledged up to it.
		w.mu.Unlock()
		return nil
	}
	w.waiters++
	if !w.polling {
		w.polling = true
		go w.poll()
	}
	defer func() {
		w.mu.Lock()
		w.waiters--
		w.mu.Unlock()
	}()
	for {
		moved := w.moved
		w.mu.Unlock()
		select {
		case <-ctx.Done():
			w.mu.Lock()
			err := w.err
			w.mu.Unlock()
			return errors.Join(ctx.Err(), err)
		case <-moved:
		}
		w.mu.Lock()
		if w.floor >= seq && w.err == nil {
			w.mu.Unlock()
			return nil
		}
	}
}

// poll reads the floor while anyone waits for it.
func (w *floorWatch) poll() {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		w.reading.Lock()
		_, _ = w.readNow(ctx)
		w.reading.Unlock()
		cancel()
		w.mu.Lock()
		close(w.moved)
		w.moved = make(chan struct{})
		if w.waiters == 0 {
			w.polling = false
			w.mu.Unlock()
			return
		}
		w.mu.Unlock()
		time.Sleep(fenceRead)
	}
}

// fence waits, at most FenceWait, until the projection has passed the tenant's last
// otp.challenge on OTP_CHALLENGES.
func (s *Service) fence(ctx context.Context, tenant string) error {
	if s.challenges == nil || s.floor == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.FenceWait)
	defer cancel()
	last, err := s.challenges.GetLastMsgForSubject(ctx, events.TypeChallenge.Subject(tenant))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil // the tenant never had a challenge
	}
	if err != nil {
		return err
	}
	return s.floor.wait(ctx, last.Sequence)
}

// floorAge is how old a floor the supersession index prunes with may be: a staler one
// only keeps supersessions the projection has applied a little longer.
const floorAge = 100 * time.Millisecond

// supersessionIndex holds, per tenant, the supersessions on OTP_CHALLENGES the
// projection may not have applied yet.
type supersessionIndex struct {
	mu      sync.Mutex
	tenants map[string]*tenantSupersessions
}

// tenantSupersessions is one tenant's part of the index.
type tenantSupersessions struct {
	// mu is held while the stream is read, so the groups of a tenant read it once.
	mu sync.Mutex
	// read: every otp.challenge_superseded of the tenant up to this sequence is known.
	read uint64
	// ahead are the supersessions past the projection's floor, by the request id they
	// name.
	ahead map[string][]aheadSupersession
}

// aheadSupersession is a supersession the projection may not have applied.
type aheadSupersession struct {
	challengeID string
	seq         uint64
	stored      time.Time
}

// superseded tells whether a supersession the index holds closes challenge id of
// request requestID.
type superseded map[string][]string

func (sup superseded) closes(requestID, challengeID string) bool {
	for _, id := range sup[requestID] {
		if id == challengeID {
			return true
		}
	}
	return false
}

// supersessions reads what the stream holds of the tenant's supersessions past what the
// index knows, one read of the tenant's last supersession and one of each newer one, and
// answers those of requestIDs that are past the projection's floor (those at or below it
// are in the database).
func (s *Service) supersessions(ctx context.Context, tenant string, requestIDs []string) (superseded, error) {
	if s.challenges == nil || s.floor == nil {
		return nil, nil // not running: nothing to read
	}
	s.index.mu.Lock()
	ts := s.index.tenants[tenant]
	if ts == nil {
		ts = &tenantSupersessions{ahead: map[string][]aheadSupersession{}}
		s.index.tenants[tenant] = ts
	}
	s.index.mu.Unlock()

	ts.mu.Lock()
	defer ts.mu.Unlock()
	subject := events.TypeChallengeSuperseded.Subject(tenant)
	var last uint64
	switch m, err := s.challenges.GetLastMsgForSubject(ctx, subject); {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		return nil, fmt.Errorf("the last supersession of %s: %w", tenant, err)
	default:
		last = m.Sequence
	}
	floor, err := s.floor.recent(ctx, floorAge)
	if err != nil {
		return nil, fmt.Errorf("the projection's floor: %w", err)
	}
	if last < ts.read {
		// The stream was made again: its sequences start over.
		ts.read, ts.ahead = 0, map[string][]aheadSupersession{}
	}
	for from := max(ts.read, floor) + 1; from <= last; {
		m, err := s.challenges.GetMsg(ctx, from, jetstream.WithGetMsgSubject(subject))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break // removed since (the stream's limits): it closed an expired challenge
		}
		if err != nil {
			return nil, fmt.Errorf("supersession %d of %s: %w", from, tenant, err)
		}
		if m.Sequence > last {
			break
		}
		// What the projection would refuse (malformed, another tenant's) it never
		// applies; here it closes nothing either.
		var e events.Superseded
		if events.DecodeEvent(m.Data, &e) == nil && checkCommon(tenant, e.Tenant, e.ChallengeID, e.RequestID) == nil {
			ts.ahead[e.RequestID] = append(ts.ahead[e.RequestID], aheadSupersession{challengeID: e.ChallengeID, seq: m.Sequence, stored: m.Time})
		}
		from = m.Sequence + 1
	}
	ts.read = max(ts.read, last)
	// Applied, or older than any code it could close: a code lives at most MaxCodeTTL
	// after its challenge's supersession, and a minute covers the clocks' skew.
	expired := time.Now().Add(-events.MaxCodeTTL - time.Minute)
	for r, as := range ts.ahead {
		as = slices.DeleteFunc(as, func(a aheadSupersession) bool { return a.seq <= floor || a.stored.Before(expired) })
		if len(as) == 0 {
			delete(ts.ahead, r)
		} else {
			ts.ahead[r] = as
		}
	}
	var sup superseded
	for _, r := range requestIDs {
		for _, a := range ts.ahead[r] {
			if sup == nil {
				sup = superseded{}
			}
			sup[r] = append(sup[r], a.challengeID)
		}
	}
	return sup, nil
}
