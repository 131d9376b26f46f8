package sesfeedback

import (
	"bytes"
	"encoding/json"
	"strings"

	"github.com/otpflow/otpflow/events"
)

// Redact is a queue message body fit to keep where an erasure cannot reach it (a dead
// letter of the feedback queue, under tenant _unknown): every email address and IP
// address replaced (events.RedactAddresses, events.RedactIPs) in every string and name of
// its JSON, and of the JSON inside a string, as SNS carries the SES record in Message
// (destination, commonHeaders, bouncedRecipients, diagnostic codes). Redacting decoded
// strings keeps the JSON valid, where redacting its text would eat escapes. A body that
// is not JSON is redacted as text. A body with nothing to redact comes back as it is;
// one with something is re-encoded (names in sorted order).
func Redact(body []byte) []byte {
	v, ok := decodeJSON(string(body))
	if !ok {
		return []byte(redactText(string(body)))
	}
	out, changed := redactValue(v)
	if !changed {
		return body
	}
	return encodeJSON(out)
}

func redactText(s string) string { return events.RedactIPs(events.RedactAddresses(s)) }

// decodeJSON reads s as one JSON object or array, numbers as written.
func decodeJSON(s string) (any, bool) {
	t := strings.TrimSpace(s)
	if t == "" || t[0] != '{' && t[0] != '[' || !json.Valid([]byte(t)) {
		return nil, false
	}
	d := json.NewDecoder(strings.NewReader(t))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		return nil, false
	}
	return v, true
}

func encodeJSON(v any) []byte {
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(false) // "<address>", not "\u003caddress\u003e"
	_ = e.Encode(v)        // values decoded from JSON always encode
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// redactValue redacts v's strings and names, reporting whether any changed.
func redactValue(v any) (any, bool) {
	switch v := v.(type) {
	case string:
		if inner, ok := decodeJSON(v); ok {
			out, changed := redactValue(inner)
			if changed {
				return string(encodeJSON(out)), true
			}
			return v, false
		}
		r := redactText(v)
		return r, r != v
	case []any:
		changed := false
		for i, e := range v {
			var c bool
			v[i], c = redactValue(e)
			changed = changed || c
		}
		return v, changed
	case map[string]any:
		changed := false
		out := make(map[string]any, len(v))
		for k, e := range v {
			rk := redactText(k)
			re, c := redactValue(e)
			changed = changed || c || rk != k
			out[rk] = re
		}
		return out, changed
	}
	return v, false
}
