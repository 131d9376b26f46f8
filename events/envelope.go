package events

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
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
	// TraceParent is the W3C traceparent to continue; empty starts a new trace.
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
	m.Header.Set(HeaderTraceParent, ChildTraceParent(env.TraceParent))
	return m, nil
}

// ChildTraceParent returns a traceparent for a new span in the trace of parent, or in a new
// trace when parent is empty or malformed.
func ChildTraceParent(parent string) string {
	traceID := ""
	if len(parent) == 55 && parent[2] == '-' && parent[35] == '-' && parent[52] == '-' {
		if _, err := hex.DecodeString(parent[3:35]); err == nil {
			traceID = parent[3:35]
		}
	}
	if traceID == "" {
		traceID = randomHex(16)
	}
	return "00-" + traceID + "-" + randomHex(8) + "-01"
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return hex.EncodeToString(b)
}
