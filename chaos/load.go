package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Kind is what a request of the load is for.
type Kind int

const (
	// Normal is a fresh request for an address of its own.
	Normal Kind = iota
	// Target is a Normal request that a later Supersede request may replace; its code
	// is never verified by the load.
	Target
	// Supersede asks again for a Target's address and purpose under a new request id:
	// the Target's challenge is superseded (or, within the cooldown, this one refused).
	Supersede
	// Invalid has an address that is not one: it is refused.
	Invalid
	// Test is for one of the tenant's test recipients: issued with the fixed code, never
	// mailed.
	Test
	// Repeat is an app's retry of a Normal request, published again under another
	// message id so the stream does not drop it: the issuer must treat it as the same.
	Repeat
)

func (k Kind) String() string {
	return [...]string{"normal", "target", "supersede", "invalid", "test", "repeat"}[k]
}

// Request is one otp.requested the load published.
type Request struct {
	ID        string
	Kind      Kind
	Recipient string
	Of        string    // Supersede and Repeat: the request they follow
	At        time.Time // first publish attempt
	Acked     bool      // JetStream stored it (the app saw the ack)
	Seq       uint64    // its sequence on OTP_REQUESTS, from the ack
}

// Load is an upstream app: it publishes otp.requested.<tenant> as plain JSON at a steady
// rate, each with its request id as Nats-Msg-Id, retrying a publish until it is
// acknowledged (as an app with a retry policy does, for at most PublishFor).
type Load struct {
	Rate       int
	PublishFor time.Duration

	js      jetstream.JetStream
	mu      sync.Mutex
	reqs    []*Request
	byID    map[string]*Request
	targets []*Request // Target requests not yet superseded
	normals []*Request // Normal requests not yet repeated
	tests   int
	lastAck time.Time
	wg      sync.WaitGroup
	stop    chan struct{}
	stopped chan struct{}
}

// NewLoad prepares a load of rate requests per second on js.
func NewLoad(js jetstream.JetStream, rate int) *Load {
	return &Load{Rate: rate, PublishFor: 60 * time.Second, js: js, byID: map[string]*Request{}}
}

// Start begins publishing; Stop ends it.
func (l *Load) Start() {
	l.stop, l.stopped = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(l.stopped)
		tick := time.NewTicker(time.Second / time.Duration(l.Rate))
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-l.stop:
				return
			case <-tick.C:
				l.publish(l.next(i))
			}
		}
	}()
}

// Stop ends the load and waits until every request is acknowledged or given up.
func (l *Load) Stop() {
	close(l.stop)
	<-l.stopped
	l.wg.Wait()
}

// next decides the i-th request: mostly fresh requests, with a few of each other kind.
func (l *Load) next(i int) *Request {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	r := &Request{ID: fmt.Sprintf("r%d", i), Kind: Normal, Recipient: fmt.Sprintf("u%d@example.com", i), At: now}
	switch i % 50 {
	case 0:
		r.Kind, r.Recipient = Invalid, fmt.Sprintf("u%d-at-example.com", i)
	case 1, 2:
		// A target old enough that the recipient cooldown (1 s) has passed.
		if len(l.targets) > 0 && now.Sub(l.targets[0].At) > 1500*time.Millisecond {
			t := l.targets[0]
			l.targets = l.targets[1:]
			r.Kind, r.Recipient, r.Of = Supersede, t.Recipient, t.ID
		}
	case 3:
		if l.tests < testRecipients {
			r.Kind, r.Recipient = Test, TestRecipient(l.tests)
			l.tests++
		}
	case 4:
		if len(l.normals) > 0 {
			o := l.normals[0]
			l.normals = l.normals[1:]
			r.Kind, r.Recipient, r.Of = Repeat, o.Recipient, o.ID
		}
	case 5, 6, 7, 8, 9:
		r.Kind = Target
	}
	switch r.Kind {
	case Target:
		l.targets = append(l.targets, r)
	case Normal:
		if i%7 == 0 {
			l.normals = append(l.normals, r)
		}
	}
	l.reqs = append(l.reqs, r)
	if r.Kind != Repeat {
		l.byID[r.ID] = r
	}
	return r
}

type requestBody struct {
	RequestID string `json:"request_id"`
	Recipient string `json:"recipient"`
	Purpose   string `json:"purpose"`
}

func (l *Load) publish(r *Request) {
	id := r.ID
	if r.Kind == Repeat {
		id = r.Of
	}
	body, _ := json.Marshal(requestBody{RequestID: id, Recipient: r.Recipient, Purpose: "login"})
	msg := &nats.Msg{Subject: "otp.requested." + Tenant, Data: body, Header: nats.Header{}}
	msg.Header.Set(nats.MsgIdHdr, r.ID) // a Repeat has an id of its own: the stream keeps it
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		deadline := r.At.Add(l.PublishFor)
		for time.Now().Before(deadline) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			ack, err := l.js.PublishMsg(ctx, msg)
			cancel()
			if err == nil {
				l.mu.Lock()
				r.Acked, r.Seq = true, ack.Sequence
				l.lastAck = time.Now()
				l.mu.Unlock()
				return
			}
			if !errors.Is(err, context.DeadlineExceeded) {
				time.Sleep(100 * time.Millisecond) // an app's retry pause (no responders, reconnecting)
			}
		}
	}()
}

// Requests returns every request published so far.
func (l *Load) Requests() []Request {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]Request, len(l.reqs))
	for i, r := range l.reqs {
		out[i] = *r
	}
	return out
}

// kind is the kind of request id, Repeat for one the load did not make.
func (l *Load) kind(id string) Kind {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r, ok := l.byID[id]; ok {
		return r.Kind
	}
	return Repeat
}

// LastAck is when JetStream last acknowledged a request.
func (l *Load) LastAck() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastAck
}
