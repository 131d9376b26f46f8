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
// database a verify's transaction reads, or was refused by the projection: malformed
// (dead-lettered), naming another request's challenge (closes nothing), or dead-lettered
// after its deliveries ran out (the one gap: services/verifier/README.md).

// errSupersessionsUnknown: the stream could not be read for the tenant's supersessions,
// so a verify that would succeed fails (nothing of it is written; the app asks again).
var errSupersessionsUnknown = errors.New("the supersessions on " + events.StreamChallenges + " could not be read")

// fenceRead is how often verifies waiting in the fence see the projection's floor.
const fenceRead = 5 * time.Millisecond

// floorWatch follows the acknowledgement floor of the challenge projection's durable:
// one read of the consumer's info at a time, shared by the verifies waiting in the fence
// and by the supersession index.
type floorWatch struct {
	read func(context.Context) (uint64, error)
	// reading holds a token while the floor is read, so reads are one at a time and the
	// floor is always the latest read's.
	reading chan struct{}

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
	return &floorWatch{read: read, moved: make(chan struct{}), reading: make(chan struct{}, 1)}
}

// recent is the floor as read at most age ago, read now if it was not. If it cannot be
// read now, the last floor read answers: it is still true, only lower. An error means
// none was ever read.
func (w *floorWatch) recent(ctx context.Context, age time.Duration) (uint64, error) {
	select {
	case w.reading <- struct{}{}:
	case <-ctx.Done():
		return w.lastRead(ctx.Err())
	}
	defer func() { <-w.reading }()
	w.mu.Lock()
	floor, fresh := w.floor, !w.readAt.IsZero() && time.Since(w.readAt) <= age
	w.mu.Unlock()
	if fresh {
		return floor, nil
	}
	if floor, err := w.readNow(ctx); err == nil {
		return floor, nil
	} else {
		return w.lastRead(err)
	}
}

// known is the last floor read (0 before the first): still true, if lower than now.
func (w *floorWatch) known() uint64 {
	if w == nil {
		return 0
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.floor
}

// lastRead is the last floor read, or err if none was.
func (w *floorWatch) lastRead(err error) (uint64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.readAt.IsZero() {
		return 0, err
	}
	return w.floor, nil
}

// readNow reads the floor; the caller holds w.reading.
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
	if w.floor >= seq {
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
		if w.floor >= seq {
			w.mu.Unlock()
			return nil
		}
	}
}

// poll reads the floor while anyone waits for it.
func (w *floorWatch) poll() {
	for {
		w.reading <- struct{}{}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, _ = w.readNow(ctx)
		cancel()
		<-w.reading
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
	last, err := s.lastSequence(ctx, events.TypeChallenge.Subject(tenant))
	if err != nil || last == 0 { // 0: the tenant never had a challenge
		return err
	}
	return s.floor.wait(ctx, last)
}

// lastSequence is the sequence of the last message of subject on OTP_CHALLENGES, 0 if
// there is none.
func (s *Service) lastSequence(ctx context.Context, subject string) (uint64, error) {
	m, err := s.challenges.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return m.Sequence, nil
}

// floorEvery is how often the projection's floor is read for the supersession index: a
// staler one only keeps supersessions the projection has applied a little longer.
const floorEvery = 100 * time.Millisecond

// follow reads the projection's floor every floorEvery until ctx is cancelled.
func (w *floorWatch) follow(ctx context.Context) error {
	t := time.NewTicker(floorEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			rctx, cancel := context.WithTimeout(ctx, time.Second)
			_, _ = w.recent(rctx, floorEvery/2)
			cancel()
		}
	}
}

// supersessionRead bounds a verify group's read of the supersessions: past it, the
// group goes on with what the index held (or nothing, if it could not have it), and its
// verifies that would succeed fail.
const supersessionRead = time.Second

// maxAhead bounds the supersessions the index holds for one tenant (while the
// projection's floor is held up, they pile up): past it, the tenant's verifies that
// would succeed fail until the floor moves.
const maxAhead = 100_000

// supersessionIndex holds, per tenant, the supersessions on OTP_CHALLENGES the
// projection may not have applied yet.
type supersessionIndex struct {
	mu      sync.Mutex
	tenants map[string]*tenantSupersessions
	// most bounds the supersessions held per tenant (maxAhead; tests lower it).
	most int
}

// tenantSupersessions is one tenant's part of the index.
type tenantSupersessions struct {
	// reading holds a token while the stream is read, so the groups of a tenant read it
	// once, each waiting for it no longer than its deadline.
	reading chan struct{}
	// read: every otp.challenge_superseded of the tenant up to this sequence is known.
	read uint64
	// ahead are the supersessions past the projection's floor, in stream order (their
	// sequences and read times grow), and byRequest the challenge ids they close by the
	// request id they name.
	ahead     []aheadSupersession
	byRequest map[string][]string
}

// aheadSupersession is a supersession the projection may not have applied.
type aheadSupersession struct {
	requestID, challengeID string
	seq                    uint64
	// readAt is when the index read it, on the process clock: no earlier than it was
	// stored.
	readAt time.Time
}

// superseded tells whether a supersession the index holds closes challenge id of
// request requestID.
type superseded map[string][]string

func (sup superseded) closes(requestID, challengeID string) bool {
	return slices.Contains(sup[requestID], challengeID)
}

// supersessions reads what the stream holds of the tenant's supersessions past what the
// index knows, one read of the tenant's last supersession and one of each newer one, and
// answers those of requestIDs that are past floor, a floor of the projection read before
// the caller reads the challenges (those at or below it are in the database). An error
// means the answer may lack one.
func (s *Service) supersessions(ctx context.Context, tenant string, requestIDs []string, floor uint64) (superseded, error) {
	if s.challenges == nil || s.floor == nil {
		return nil, nil // not running: nothing to read
	}
	s.index.mu.Lock()
	ts := s.index.tenants[tenant]
	if ts == nil {
		ts = &tenantSupersessions{reading: make(chan struct{}, 1), byRequest: map[string][]string{}}
		s.index.tenants[tenant] = ts
	}
	s.index.mu.Unlock()

	select {
	case ts.reading <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for another read of %s's supersessions: %w", tenant, ctx.Err())
	}
	defer func() { <-ts.reading }()
	subject := events.TypeChallengeSuperseded.Subject(tenant)
	last, err := s.lastSequence(ctx, subject)
	if err != nil {
		// What the index holds still closes challenges; what it lacks is unknown.
		return ts.of(requestIDs), fmt.Errorf("the last supersession of %s: %w", tenant, err)
	}
	if last < ts.read {
		// The stream was made again: its sequences start over.
		ts.read, ts.ahead, ts.byRequest = 0, nil, map[string][]string{}
	}
	ts.prune(floor, time.Now().Add(-events.MaxCodeTTL-time.Minute))
	err = ts.readPast(ctx, s.challenges, subject, tenant, max(ts.read, floor), last, s.index.most)
	return ts.of(requestIDs), err
}

// of is what the index holds of requestIDs.
func (ts *tenantSupersessions) of(requestIDs []string) superseded {
	var sup superseded
	for _, r := range requestIDs {
		if ids := ts.byRequest[r]; len(ids) > 0 {
			if sup == nil {
				sup = superseded{}
			}
			sup[r] = slices.Clone(ids)
		}
	}
	return sup
}

// readPast reads the tenant's supersessions after sequence from, up to last, keeping
// what it read should a read fail, and no more than most.
func (ts *tenantSupersessions) readPast(ctx context.Context, st jetstream.Stream, subject, tenant string, from, last uint64, most int) error {
	for from < last {
		if len(ts.ahead) >= most {
			return fmt.Errorf("%d supersessions of %s past the projection's floor: no more are read until it moves", len(ts.ahead), tenant)
		}
		m, err := st.GetMsg(ctx, from+1, jetstream.WithGetMsgSubject(subject))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break // removed since (the stream's limits): it closed an expired challenge
		}
		if err != nil {
			return fmt.Errorf("the supersessions of %s after sequence %d: %w", tenant, from, err)
		}
		if m.Sequence > last {
			break
		}
		// What the projection would refuse (malformed, another tenant's) it never
		// applies; here it closes nothing either.
		var e events.Superseded
		if events.DecodeEvent(m.Data, &e) == nil && checkCommon(tenant, e.Tenant, e.ChallengeID, e.RequestID) == nil {
			ts.ahead = append(ts.ahead, aheadSupersession{requestID: e.RequestID, challengeID: e.ChallengeID, seq: m.Sequence, readAt: time.Now()})
			ts.byRequest[e.RequestID] = append(ts.byRequest[e.RequestID], e.ChallengeID)
		}
		from = m.Sequence
		ts.read = max(ts.read, from)
	}
	ts.read = max(ts.read, last)
	return nil
}

// prune lets go of the supersessions the projection has applied (at or below floor)
// and of those read before expired, older than any code they could close (a code lives
// at most MaxCodeTTL after its challenge's supersession; the extra minute covers the
// clocks' skew).
func (ts *tenantSupersessions) prune(floor uint64, expired time.Time) {
	n := 0
	for n < len(ts.ahead) && (ts.ahead[n].seq <= floor || ts.ahead[n].readAt.Before(expired)) {
		a := ts.ahead[n]
		ids := ts.byRequest[a.requestID]
		if i := slices.Index(ids, a.challengeID); i >= 0 {
			ids = slices.Delete(ids, i, i+1)
		}
		if len(ids) == 0 {
			delete(ts.byRequest, a.requestID)
		} else {
			ts.byRequest[a.requestID] = ids
		}
		n++
	}
	ts.ahead = slices.Delete(ts.ahead, 0, n)
}
