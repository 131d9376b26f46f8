package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
)

// Event is one OTP_EVENTS message as the suite reads it.
type Event struct {
	Seq         uint64
	Type        events.Type
	Tenant      string
	ID          string    // Nats-Msg-Id (= ce-id)
	At          time.Time // when the stream stored it
	ChallengeID string
	RequestID   string
	CodeSeq     int
	Test        bool
	Unconfirmed bool
	Reason      string
	RequestSeq  uint64 // rejected: the request's sequence on OTP_REQUESTS
}

// Code names one issued code.
type Code struct {
	ChallengeID string
	Seq         int
}

// Ledger reads OTP_EVENTS from its start, incrementally, and indexes the load tenant's
// events by code, request and challenge.
type Ledger struct {
	js jetstream.JetStream

	mu         sync.Mutex
	last       uint64
	all        []Event
	issued     map[Code]Event
	byRequest  map[string][]Code  // issued codes of a request id
	terminal   map[Code][]Event   // delivered, delivery_failed, dispatch_expired
	rejected   map[uint64][]Event // by the request's sequence on OTP_REQUESTS
	superseded map[string][]Event // by challenge id
	verified   map[string]int     // otp.verified events by challenge id
}

// NewLedger reads OTP_EVENTS through js.
func NewLedger(js jetstream.JetStream) *Ledger {
	return &Ledger{js: js, issued: map[Code]Event{}, byRequest: map[string][]Code{}, terminal: map[Code][]Event{},
		rejected: map[uint64][]Event{}, superseded: map[string][]Event{}, verified: map[string]int{}}
}

// Poll reads what the stream stored since the last Poll. An error (NATS down, a leader
// election) leaves the ledger as it was; the next Poll carries on.
func (l *Ledger) Poll() error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := l.js.Stream(ctx, events.StreamEvents)
	if err != nil {
		return err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return err
	}
	l.mu.Lock()
	from := l.last + 1
	l.mu.Unlock()
	if info.State.LastSeq < from {
		return nil
	}
	cons, err := l.js.OrderedConsumer(ctx, events.StreamEvents, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: from})
	if err != nil {
		return err
	}
	for {
		batch, err := cons.FetchNoWait(1000)
		if err != nil {
			return err
		}
		n := 0
		for m := range batch.Messages() {
			n++
			l.add(m)
		}
		if err := batch.Error(); err != nil {
			return err
		}
		l.mu.Lock()
		done := l.last >= info.State.LastSeq
		l.mu.Unlock()
		if n == 0 || done {
			return nil
		}
	}
}

// payload holds the fields of any OTP_EVENTS body the suite looks at.
type payload struct {
	ChallengeID string `json:"challenge_id"`
	RequestID   string `json:"request_id"`
	CodeSeq     int    `json:"code_seq"`
	Test        bool   `json:"test"`
	Unconfirmed bool   `json:"unconfirmed"`
	Reason      string `json:"reason"`
	RequestSeq  uint64 `json:"request_seq"`
}

func (l *Ledger) add(m jetstream.Msg) {
	meta, err := m.Metadata()
	if err != nil {
		return
	}
	e := Event{Seq: meta.Sequence.Stream, At: meta.Timestamp, ID: m.Headers().Get("Nats-Msg-Id")}
	e.Type, e.Tenant, _ = events.SplitSubject(m.Subject())
	var p payload
	_ = json.Unmarshal(m.Data(), &p)
	e.ChallengeID, e.RequestID, e.CodeSeq, e.Test, e.Unconfirmed, e.Reason = p.ChallengeID, p.RequestID, p.CodeSeq, p.Test, p.Unconfirmed, p.Reason
	e.RequestSeq = p.RequestSeq

	l.mu.Lock()
	defer l.mu.Unlock()
	if e.Seq <= l.last {
		return
	}
	l.last = e.Seq
	l.all = append(l.all, e)
	if e.Tenant != Tenant {
		return
	}
	c := Code{e.ChallengeID, e.CodeSeq}
	switch e.Type {
	case events.TypeIssued:
		if _, ok := l.issued[c]; !ok {
			l.byRequest[e.RequestID] = append(l.byRequest[e.RequestID], c)
		}
		l.issued[c] = e
	case events.TypeDelivered, events.TypeDeliveryFailed, events.TypeDispatchExpired:
		l.terminal[c] = append(l.terminal[c], e)
	case events.TypeRejected:
		l.rejected[e.RequestSeq] = append(l.rejected[e.RequestSeq], e)
	case events.TypeSuperseded:
		l.superseded[e.ChallengeID] = append(l.superseded[e.ChallengeID], e)
	case events.TypeVerified:
		l.verified[e.ChallengeID]++
	}
}

// Outcome is the first event that ends request r, if one has: its rejection, its test
// code's issue, or its code's terminal event.
func (l *Ledger) Outcome(r Request) (Event, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if rej := l.rejected[r.Seq]; len(rej) > 0 {
		return rej[0], true
	}
	for _, c := range l.byRequest[r.ID] {
		if l.issued[c].Test {
			return l.issued[c], true
		}
		if t := l.terminal[c]; len(t) > 0 {
			return t[0], true
		}
	}
	return Event{}, false
}

// Settled reports whether every request in reqs has an outcome, naming one that has not.
func (l *Ledger) Settled(reqs []Request) (bool, string) {
	for _, r := range reqs {
		if _, ok := l.Outcome(r); !ok {
			return false, r.ID
		}
	}
	return true, ""
}

// Events returns every OTP_EVENTS message read so far, of every tenant.
func (l *Ledger) Events() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Event(nil), l.all...)
}

// String sums up the ledger.
func (l *Ledger) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return fmt.Sprintf("%d events, %d codes issued, %d with a terminal event, %d refused requests",
		len(l.all), len(l.issued), len(l.terminal), len(l.rejected))
}
