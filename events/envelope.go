package events

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// CloudEvents 1.0 attributes travel as NATS headers (the CloudEvents NATS binding), next
// to Nats-Msg-Id and W3C traceparent.
const (
	HeaderSpecVersion = "ce-specversion"
	HeaderID          = "ce-id"
	HeaderType        = "ce-type"
	HeaderSource      = "ce-source"
	HeaderTime        = "ce-time"
	HeaderSubject     = "ce-subject"
	HeaderContentType = "content-type"
	HeaderTraceParent = "traceparent"
)

// Envelope says who publishes a message and in which trace.
type Envelope struct {
	// Source is the CloudEvents source, e.g. "otpflow/issuer".
	Source string
	// TraceParent is the W3C traceparent of the publisher's span: the message carries it
	// as it is, so the consumer's span is that span's child. Empty or malformed starts a
	// new trace (a traceparent of its own, see ChildTraceParent).
	TraceParent string
	// Time is the event time; zero means now.
	Time time.Time
}

// NewMsg builds the message of type typ for tenant, with body v encoded as JSON. id is the
// deterministic idempotency key: it becomes both Nats-Msg-Id and ce-id. subject (the
// CloudEvents subject, e.g. a challenge id) may be empty.
func NewMsg(typ Type, tenant, id, ceSubject string, v any, env Envelope) (*nats.Msg, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", typ, err)
	}
	t := env.Time
	if t.IsZero() {
		t = time.Now()
	}
	m := nats.NewMsg(typ.Subject(tenant))
	m.Data = data
	m.Header.Set(jetstream.MsgIDHeader, id)
	m.Header.Set(HeaderSpecVersion, "1.0")
	m.Header.Set(HeaderID, id)
	m.Header.Set(HeaderType, string(typ))
	m.Header.Set(HeaderSource, env.Source)
	m.Header.Set(HeaderTime, t.UTC().Format(time.RFC3339Nano))
	m.Header.Set(HeaderContentType, "application/json")
	if ceSubject != "" {
		m.Header.Set(HeaderSubject, ceSubject)
	}
	tp := env.TraceParent
	if !validTraceParent(tp) {
		tp = ChildTraceParent("")
	}
	m.Header.Set(HeaderTraceParent, tp)
	return m, nil
}

// ChildTraceParent returns a traceparent for a new span in the trace of parent, or in a new
// trace when parent is empty or malformed.
func ChildTraceParent(parent string) string {
	traceID := ""
	if validTraceParent(parent) {
		traceID = parent[3:35]
	}
	if traceID == "" {
		traceID = randomHex(16)
	}
	return "00-" + traceID + "-" + randomHex(8) + "-01"
}

// validTraceParent reports whether s is a version-00 W3C traceparent with non-zero ids.
func validTraceParent(s string) bool {
	if len(s) != 55 || s[:3] != "00-" || s[35] != '-' || s[52] != '-' {
		return false
	}
	for _, f := range []string{s[3:35], s[36:52], s[53:]} {
		b, err := hex.DecodeString(f)
		if err != nil || strings.ToLower(f) != f {
			return false
		}
		zero := true
		for _, c := range b {
			zero = zero && c == 0
		}
		if zero && len(b) > 1 {
			return false
		}
	}
	return true
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return hex.EncodeToString(b)
}
