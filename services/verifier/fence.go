package verifier

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// The fences: what a verify reads of the projection must not be older than what the
// stream held when the verify came.
//
//   - A verify for a request the projection does not know waits until the projection has
//     passed the tenant's last otp.challenge (read-your-writes: an app may verify the
//     moment its code is mailed).
//   - A verify that would succeed waits until the projection has passed the tenant's last
//     otp.challenge_superseded, read when the verify's group began. The issuer publishes
//     a supersession with the newer code's events, right after it commits them, so once
//     the newer code can have been mailed the older one no longer verifies, however far
//     the projection lags. A supersession published after the group began is not waited
//     for: the verify came first.
//
// Both compare a stream sequence with the projection durable's acknowledgement floor,
// which moves only once a batch is committed. The floor is the whole stream's, so a
// projection held up by any tenant's event holds up the successful verifies of a tenant
// whose last supersession is newer than the floor; they wait at most FenceWait and then
// fail (an error, which the app retries), never succeed unfenced.

// errSupersessionPending: the verify would succeed, but a supersession of its tenant that
// may close its challenge is not projected yet. Nothing of the verify was written.
var errSupersessionPending = errors.New("a supersession of the tenant is not projected yet")

// fenceRead is how often waiting verifies see the projection's floor.
const fenceRead = 5 * time.Millisecond

// floorWatch follows the acknowledgement floor of the challenge projection's durable:
// one read of the consumer's info serves every verify waiting for it.
type floorWatch struct {
	read func(context.Context) (uint64, error)

	mu      sync.Mutex
	floor   uint64
	err     error
	waiters int
	polling bool
	// moved is closed after each read, and replaced.
	moved chan struct{}
}

func newFloorWatch(read func(context.Context) (uint64, error)) *floorWatch {
	return &floorWatch{read: read, moved: make(chan struct{})}
}

// known is the highest floor read so far.
func (w *floorWatch) known() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.floor
}

// wait returns once the floor is at seq or past it, or with ctx's error (and the last
// read's, if it failed).
func (w *floorWatch) wait(ctx context.Context, seq uint64) error {
	w.mu.Lock()
	if w.floor >= seq {
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
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		floor, err := w.read(ctx)
		cancel()
		w.mu.Lock()
		if err == nil {
			w.floor = max(w.floor, floor)
		}
		w.err = err
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

// refresh reads the floor once, for a caller that does not wait.
func (w *floorWatch) refresh(ctx context.Context) (uint64, error) {
	floor, err := w.read(ctx)
	if err != nil {
		return 0, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.floor = max(w.floor, floor)
	return w.floor, nil
}

// lastOf is the sequence of the last message of typ for tenant on OTP_CHALLENGES; 0 when
// there is none (or no stream: a verifier that does not run). It reads the stream's
// leader (the stream does not allow direct gets), so it is read-after-write coherent on
// a replicated stream too.
func (s *Service) lastOf(ctx context.Context, typ events.Type, tenant string) (uint64, error) {
	if s.challenges == nil || s.floor == nil {
		return 0, nil
	}
	last, err := s.challenges.GetLastMsgForSubject(ctx, typ.Subject(tenant))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return last.Sequence, nil
}

// fence waits, at most FenceWait, until the projection has passed the tenant's last
// message of typ on OTP_CHALLENGES.
func (s *Service) fence(ctx context.Context, typ events.Type, tenant string) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.FenceWait)
	defer cancel()
	last, err := s.lastOf(ctx, typ, tenant)
	if err != nil || last == 0 {
		return err
	}
	return s.floor.wait(ctx, last)
}

// supersessionsProjected tells, for each tenant, the sequence of its last
// otp.challenge_superseded and whether the projection has passed it; the tenants are
// read at once. A tenant whose stream read fails is not projected (its verifies wait, and
// fail if it keeps failing).
func (s *Service) supersessionsProjected(ctx context.Context, tenants []string) map[string]supersessions {
	out := make(map[string]supersessions, len(tenants))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, tenant := range tenants {
		wg.Go(func() {
			last, err := s.lastOf(ctx, events.TypeChallengeSuperseded, tenant)
			st := supersessions{last: last, projected: err == nil && (last == 0 || last <= s.floor.known())}
			if err == nil && !st.projected {
				floor, err := s.floor.refresh(ctx)
				st.projected = err == nil && last <= floor
			}
			if err != nil {
				s.log.Warn("the tenant's last supersession", "tenant", tenant, "err", err)
			}
			mu.Lock()
			out[tenant] = st
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// supersessions is what a verify group knows of a tenant's supersessions.
type supersessions struct {
	// last is the sequence of the tenant's last otp.challenge_superseded (0: none, or
	// unknown when the read failed).
	last uint64
	// projected: the projection has passed last.
	projected bool
}
