package main

import (
	"bufio"
	"encoding/json"
	"io"
	"mime/quotedprintable"
	"net"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/otpflow/otpflow/events"
	"github.com/otpflow/otpflow/services/dispatcher/nullsink"
)

// benchLedger is what the bench learns of its requests from OTP_EVENTS, as an app
// consuming the event stream would: every event of the bench's tenant whose request id
// carries the run's prefix.
type benchLedger struct {
	prefix string

	mu         sync.Mutex
	challenges map[string]*benchCode // by challenge id
	requests   map[string]*benchCode // by request id
	rejected   map[string]string     // request id -> reason
	settled    int                   // requests with a final outcome
	issued     int
	delivered  int
	firstIssue time.Time
	lastIssue  time.Time
	unmatched  []benchMail
}

// benchCode is one request's code as the events and the sink tell it.
type benchCode struct {
	requestID   string
	challengeID string
	requestedAt time.Time // stored on OTP_REQUESTS (otp.issued's requested_at)
	issuedAt    time.Time
	deliveredAt time.Time // the provider's success answer (otp.delivered's delivered_at)
	outcome     string    // delivered, delivery_failed, dispatch_expired
	code        string    // from the sink
	mailed      int       // times the sink received it
	// mailedAt is when the sink took it first, by the null provider's clock: the
	// provider's answer (zero for the other sinks).
	mailedAt        time.Time
	deliveredEvents int // otp.delivered events of the code
}

type benchPayload struct {
	ChallengeID string    `json:"challenge_id"`
	RequestID   string    `json:"request_id"`
	Reason      string    `json:"reason"`
	RequestedAt time.Time `json:"requested_at"`
	IssuedAt    time.Time `json:"issued_at"`
	DeliveredAt time.Time `json:"delivered_at"`
}

func newBenchLedger(prefix string) *benchLedger {
	return &benchLedger{prefix: prefix, challenges: map[string]*benchCode{}, requests: map[string]*benchCode{}, rejected: map[string]string{}}
}

// addMsg takes one OTP_EVENTS message.
func (l *benchLedger) addMsg(m jetstream.Msg) { l.add(m.Subject(), m.Data()) }

// add takes one OTP_EVENTS message's subject and body.
func (l *benchLedger) add(subject string, data []byte) {
	typ, _, err := events.SplitSubject(subject)
	if err != nil {
		return
	}
	var p benchPayload
	if json.Unmarshal(data, &p) != nil || !strings.HasPrefix(p.RequestID, l.prefix) {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch typ {
	case events.TypeIssued:
		c := l.code(p.RequestID)
		if c.challengeID != "" {
			return // a redelivered request issued again: the issuer's idempotence says it is the same
		}
		c.challengeID, c.requestedAt, c.issuedAt = p.ChallengeID, p.RequestedAt, p.IssuedAt
		l.challenges[p.ChallengeID] = c
		l.issued++
		if l.firstIssue.IsZero() || p.IssuedAt.Before(l.firstIssue) {
			l.firstIssue = p.IssuedAt
		}
		if p.IssuedAt.After(l.lastIssue) {
			l.lastIssue = p.IssuedAt
		}
	case events.TypeDelivered, events.TypeDeliveryFailed, events.TypeDispatchExpired:
		c := l.code(p.RequestID)
		if typ == events.TypeDelivered {
			c.deliveredEvents++
		}
		if c.outcome != "" {
			return
		}
		c.outcome = strings.TrimPrefix(string(typ), "otp.")
		l.settled++
		if typ == events.TypeDelivered {
			c.deliveredAt = p.DeliveredAt
			l.delivered++
		}
	case events.TypeRejected:
		if _, seen := l.rejected[p.RequestID]; !seen {
			l.rejected[p.RequestID] = p.Reason
			l.settled++
		}
	}
}

func (l *benchLedger) code(requestID string) *benchCode {
	c := l.requests[requestID]
	if c == nil {
		c = &benchCode{requestID: requestID}
		l.requests[requestID] = c
	}
	return c
}

// counts is a consistent look at the progress.
func (l *benchLedger) counts() (issued, delivered, settled int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.issued, l.delivered, l.settled
}

// mailed records a mail the sink received for challenge with code; match ties it to its
// request once the ledger has read the challenge's otp.issued.
func (l *benchLedger) mailed(challengeID, code string, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.unmatched = append(l.unmatched, benchMail{challengeID, code, at})
}

// match ties the mails received so far to their codes. A mail of a challenge the ledger
// does not know (yet, or at all: the warm-up's) stays unmatched.
func (l *benchLedger) match() {
	l.mu.Lock()
	defer l.mu.Unlock()
	kept := l.unmatched[:0]
	for _, m := range l.unmatched {
		c := l.challenges[m.challengeID]
		if c == nil {
			kept = append(kept, m)
			continue
		}
		c.mailed++
		if c.code == "" {
			c.code = m.code
		}
		if !m.at.IsZero() && (c.mailedAt.IsZero() || m.at.Before(c.mailedAt)) {
			c.mailedAt = m.at
		}
	}
	clear(l.unmatched[len(kept):])
	l.unmatched = kept
}

type benchMail struct {
	challengeID, code string
	at                time.Time
}

// sinkCollector takes what the null provider hands over: one JSON line per accepted
// message, on one connection per dispatcher.
type sinkCollector struct {
	ln  net.Listener
	wg  sync.WaitGroup
	mu  sync.Mutex
	got []nullsink.Handed
}

func newSinkCollector() (*sinkCollector, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	c := &sinkCollector{ln: ln}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				defer conn.Close()
				sc := bufio.NewScanner(conn)
				sc.Buffer(make([]byte, 64<<10), 1<<20)
				for sc.Scan() {
					var h nullsink.Handed
					if json.Unmarshal(sc.Bytes(), &h) != nil {
						continue
					}
					c.mu.Lock()
					c.got = append(c.got, h)
					c.mu.Unlock()
				}
			}()
		}
	}()
	return c, nil
}

func (c *sinkCollector) addr() string { return c.ln.Addr().String() }

// take returns what arrived since the last take.
func (c *sinkCollector) take() []nullsink.Handed {
	c.mu.Lock()
	defer c.mu.Unlock()
	got := c.got
	c.got = nil
	return got
}

func (c *sinkCollector) close() {
	c.ln.Close()
}

// feedNullSink moves what the collector received into the ledger.
func (l *benchLedger) feedNullSink(c *sinkCollector) {
	for _, h := range c.take() {
		challenge, _, _ := strings.Cut(h.ID, ":")
		l.mailed(challenge, codeInText(h.Text), h.At)
	}
}

// feedMaildir reads every mail in dir/new (the sandbox provider's Maildir) into the ledger.
func (l *benchLedger) feedMaildir(dir string) error {
	names, err := filepath.Glob(filepath.Join(dir, "new", "*"))
	if err != nil {
		return err
	}
	for _, name := range names {
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		msg, err := mail.ReadMessage(f)
		if err == nil {
			body, _ := io.ReadAll(quotedprintable.NewReader(msg.Body))
			l.mailed(msg.Header.Get("X-Otp-Challenge-Id"), codeInText(string(body)), time.Time{})
		}
		f.Close()
	}
	return nil
}

var sixDigits = regexp.MustCompile(`\b(\d{6})\b`)

// codeInText is the first six-digit number of a mail's text: the code under the bench's
// policy (the default: six digits; the templates write the lifetime in minutes).
func codeInText(text string) string {
	if m := sixDigits.FindStringSubmatch(text); m != nil {
		return m[1]
	}
	return ""
}

// unmailed counts the codes reported delivered that the sink has not shown yet.
func (l *benchLedger) unmailed() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, c := range l.requests {
		if c.outcome == "delivered" && c.mailed == 0 {
			n++
		}
	}
	return n
}
