package chaos

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/events"
)

// Verify asks otp.verify.<tenant> whether code is right for requestID, as an app does,
// retrying while nobody answers, the service answers with an error it asks to retry, or
// the verifier does not know the challenge yet (its projection may lag), for at most
// patience. It returns the final status, and whether a
// try went unanswered (a timeout: the verifier may have acted on it).
func Verify(nc *nats.Conn, requestID, code string, patience time.Duration) (status events.VerifyStatus, unanswered bool, err error) {
	status, unanswered, _, _, err = verify(nc, requestID, code, patience)
	return status, unanswered, err
}

func verify(nc *nats.Conn, requestID, code string, patience time.Duration) (status events.VerifyStatus, unanswered bool, notFound, serviceErrors int, err error) {
	body, _ := json.Marshal(map[string]string{"request_id": requestID, "code": code})
	deadline := time.Now().Add(patience)
	var last error
	for time.Now().Before(deadline) {
		msg, err := nc.Request("otp.verify."+Tenant, body, 2*time.Second)
		if err != nil {
			last = err
			unanswered = unanswered || errors.Is(err, nats.ErrTimeout)
			time.Sleep(100 * time.Millisecond) // an app's retry pause
			continue
		}
		if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
			// The service's error answer ("500 internal error; retry"): nothing was used.
			last = fmt.Errorf("service error %s: %s", code, msg.Header.Get(micro.ErrorHeader))
			if !strings.HasPrefix(code, "5") {
				return "", unanswered, notFound, serviceErrors, last
			}
			serviceErrors++
			time.Sleep(100 * time.Millisecond) // an app's retry pause
			continue
		}
		var r events.VerifyReply
		if err := json.Unmarshal(msg.Data, &r); err != nil {
			return "", unanswered, notFound, serviceErrors, fmt.Errorf("verify reply %q: %w", msg.Data, err)
		}
		if r.Status == events.StatusNotFound {
			notFound++
			last = errors.New("not_found")
			time.Sleep(200 * time.Millisecond) // an app's retry pause
			continue
		}
		return r.Status, unanswered, notFound, serviceErrors, nil
	}
	return "", unanswered, notFound, serviceErrors, fmt.Errorf("no answer within %v: %w", patience, last)
}

// Probe is one verification the prober made.
type Probe struct {
	RequestID string
	At, Done  time.Time
	Status    events.VerifyStatus
	// Unanswered: a try went unanswered before the final status.
	Unanswered bool
	// NotFound counts not_found answers before the final one: the verifier did not know
	// the challenge of a code already mailed.
	NotFound int
	// ServiceErrors counts error answers ("500 internal error; retry") before the final one.
	ServiceErrors int
	Err           error
}

// Prober verifies mailed codes while the load runs, starting one verification every
// interval (each in its own goroutine, so one that waits does not hold up the rest):
// the users typing their codes in. It takes only Normal requests' codes, so no
// supersession races it.
type Prober struct {
	interval time.Duration
	nc       *nats.Conn
	env      *Env
	load     *Load

	mu      sync.Mutex
	probes  []Probe
	used    map[string]bool // request ids whose code was verified
	cursor  int             // mails looked at
	wg      sync.WaitGroup
	stop    chan struct{}
	stopped chan struct{}
}

// NewProber prepares a prober of the codes env's sinks receive for load's requests.
func NewProber(nc *nats.Conn, env *Env, load *Load, interval time.Duration) *Prober {
	return &Prober{interval: interval, nc: nc, env: env, load: load, used: map[string]bool{}}
}

// Start begins probing; Stop ends it.
func (p *Prober) Start() {
	p.stop, p.stopped = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(p.stopped)
		tick := time.NewTicker(p.interval)
		defer tick.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-tick.C:
			}
			id, code, ok := p.nextCode()
			if !ok {
				continue
			}
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				pr := Probe{RequestID: id, At: time.Now()}
				pr.Status, pr.Unanswered, pr.NotFound, pr.ServiceErrors, pr.Err = verify(p.nc, id, code, 90*time.Second)
				pr.Done = time.Now()
				p.mu.Lock()
				p.probes = append(p.probes, pr)
				p.mu.Unlock()
			}()
		}
	}()
}

// Stop starts no more probes and waits for those under way.
func (p *Prober) Stop() {
	close(p.stop)
	<-p.stopped
	p.wg.Wait()
}

// nextCode is the next mailed code of a Normal request not verified yet.
func (p *Prober) nextCode() (string, string, bool) {
	mails := p.env.Mails()
	p.mu.Lock()
	defer p.mu.Unlock()
	for ; p.cursor < len(mails); p.cursor++ {
		m := mails[p.cursor]
		id, ok := requestOf(m.To)
		if !ok || p.used[id] || m.Code == "" || p.load.kind(id) != Normal {
			continue
		}
		p.used[id] = true
		p.cursor++
		return id, m.Code, true
	}
	return "", "", false
}

// Probes returns the probes made so far.
func (p *Prober) Probes() []Probe {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Probe(nil), p.probes...)
}

// Used reports whether the prober verified requestID's code.
func (p *Prober) Used(requestID string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.used[requestID]
}

// requestOf is the request id of a load address u<i>@example.com: r<i>.
func requestOf(addr string) (string, bool) {
	local, ok := strings.CutSuffix(addr, "@example.com")
	if !ok || !strings.HasPrefix(local, "u") {
		return "", false
	}
	return "r" + local[1:], true
}
