package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/mail"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Size limits of the public payloads. A larger body is refused before it is parsed.
const (
	MaxRequestedSize     = 8 << 10
	MaxVerifyRequestSize = 1 << 10
)

// ValidationError says why a payload was refused. Reason is one of the contract's reject
// reasons; Field names the offending JSON field when there is one. Detail is safe to
// publish: it never quotes the field's value.
type ValidationError struct {
	Reason RejectReason
	Field  string
	Detail string
}

func (e *ValidationError) Error() string {
	if e.Field != "" {
		return fmt.Sprintf("%s: %s: %s", e.Reason, e.Field, e.Detail)
	}
	return fmt.Sprintf("%s: %s", e.Reason, e.Detail)
}

// Is makes errors.Is(err, &ValidationError{Reason: r}) match on the reason alone.
func (e *ValidationError) Is(target error) bool {
	t, ok := target.(*ValidationError)
	return ok && t.Reason == e.Reason && (t.Field == "" || t.Field == e.Field)
}

func invalid(reason RejectReason, field, format string, args ...any) *ValidationError {
	return &ValidationError{Reason: reason, Field: field, Detail: fmt.Sprintf(format, args...)}
}

var (
	requestIDPattern = regexp.MustCompile(`^[!-~]{1,128}$`)
	purposePattern   = regexp.MustCompile(`^[a-z0-9_.-]{1,32}$`)
	localePattern    = regexp.MustCompile(`^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$`)
	dnsLabelPattern  = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)
	uuidPattern      = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
)

// CanonicalAddress is the one form in which otpflow compares, keys and hashes an email
// address: surrounding space trimmed and ASCII letters lowercased. Domains are
// case-insensitive by the standard; local parts are too at every mailbox provider that
// matters, and treating "Ana@" and "ana@" as two people would let a caller sidestep
// per-recipient limits by changing case. Only ASCII is folded: Unicode case mapping
// turns distinct characters into one ("\u212Aim@" and "kim@" would be one person), so a
// non-ASCII local part stays as written. Comparing in this form never decides where a
// mail goes: a challenge's codes go to the address the challenge was created with.
func CanonicalAddress(addr string) string {
	addr = strings.TrimSpace(addr)
	return strings.Map(func(r rune) rune {
		if 'A' <= r && r <= 'Z' {
			return r + ('a' - 'A')
		}
		return r
	}, addr)
}

// MaskAddress is the masked form of an address that the audit shows: the first character
// of the local part, three stars and the domain, "a***@example.com". Text without a local
// part reads "***".
func MaskAddress(addr string) string {
	at := strings.LastIndexByte(addr, '@')
	if at < 1 {
		return "***"
	}
	_, w := utf8.DecodeRuneInString(addr)
	return addr[:w] + "***" + addr[at:]
}

// ClientNetwork is the one form in which otpflow counts a client IP for its limits: an
// IPv4 address (also when written IPv4-mapped, "::ffff:192.0.2.1"), or the /64 of an IPv6
// address, since one subscriber gets a whole /64 and rotates through it freely. Every
// spelling of one address gives one string. Text that is not an IP comes back unchanged
// (decoders refuse it before it gets here).
func ClientNetwork(ip string) string {
	a := net.ParseIP(ip)
	if a == nil {
		return ip
	}
	if v4 := a.To4(); v4 != nil {
		return v4.String()
	}
	return a.Mask(net.CIDRMask(64, 128)).String() + "/64"
}

// IsUUID reports whether s is a lowercase canonical UUID, the form of every challenge id.
func IsUUID(s string) bool { return uuidPattern.MatchString(s) }

// subjectHashPattern is a subject hash (OTP_SUBJECT_KEY): a key id, a colon and 43
// base64url characters (an HMAC-SHA256).
var subjectHashPattern = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}:[A-Za-z0-9_-]{43}$`)

// IsSubjectHash reports whether s has the form of a subject hash, "id:base64url".
func IsSubjectHash(s string) bool { return subjectHashPattern.MatchString(s) }

// DecodeRequested strictly decodes and validates an otp.requested body: at most
// MaxRequestedSize bytes, one JSON object, no unknown field, required fields present, no
// CR or LF in any field (they would reach mail headers), a bare valid recipient address.
// Every failure is a *ValidationError.
func DecodeRequested(data []byte) (Requested, error) {
	var r Requested
	if err := decodeStrict(data, MaxRequestedSize, &r); err != nil {
		return Requested{}, err
	}
	if err := r.Validate(); err != nil {
		return Requested{}, err
	}
	return r, nil
}

// Validate checks the fields of a decoded request.
func (r *Requested) Validate() error {
	fields := []struct{ name, value string }{
		{"request_id", r.RequestID}, {"recipient", r.Recipient}, {"purpose", r.Purpose},
		{"locale", r.Locale}, {"context.ip", r.Context.IP}, {"context.user_agent", r.Context.UserAgent},
		{"context.session_id", r.Context.SessionID},
	}
	for _, f := range fields {
		if err := checkText(f.name, f.value); err != nil {
			return err
		}
	}
	for k, v := range r.Metadata {
		if err := checkText("metadata", k); err != nil {
			return err
		}
		if err := checkText("metadata", v); err != nil {
			return err
		}
	}
	switch {
	case r.RequestID == "":
		return invalid(ReasonMissingField, "request_id", "required")
	case r.Recipient == "":
		return invalid(ReasonMissingField, "recipient", "required")
	case r.Purpose == "":
		return invalid(ReasonMissingField, "purpose", "required")
	}
	if !requestIDPattern.MatchString(r.RequestID) {
		return invalid(ReasonInvalidField, "request_id", "must be 1-128 visible ASCII characters")
	}
	if err := ValidateAddress(r.Recipient); err != nil {
		return err
	}
	if !purposePattern.MatchString(r.Purpose) {
		return invalid(ReasonInvalidField, "purpose", "must be 1-32 of [a-z0-9_.-]")
	}
	if r.Locale != "" && (len(r.Locale) > 35 || !localePattern.MatchString(r.Locale)) {
		return invalid(ReasonInvalidField, "locale", "must be a language tag such as en or pt-BR")
	}
	if r.TTLSeconds != 0 && (r.TTLSeconds < 30 || r.TTLSeconds > int(MaxCodeTTL.Seconds())) {
		return invalid(ReasonInvalidField, "ttl_seconds", "must be between 30 and %d", int(MaxCodeTTL.Seconds()))
	}
	if r.Context.IP != "" && net.ParseIP(r.Context.IP) == nil {
		return invalid(ReasonInvalidField, "context.ip", "must be an IPv4 or IPv6 address")
	}
	if len(r.Context.UserAgent) > 512 {
		return invalid(ReasonInvalidField, "context.user_agent", "longer than 512 bytes")
	}
	if len(r.Context.SessionID) > 128 {
		return invalid(ReasonInvalidField, "context.session_id", "longer than 128 bytes")
	}
	if len(r.Metadata) > 16 {
		return invalid(ReasonInvalidField, "metadata", "more than 16 entries")
	}
	for k, v := range r.Metadata {
		if k == "" || len(k) > 64 || len(v) > 256 {
			return invalid(ReasonInvalidField, "metadata", "keys must be 1-64 bytes and values at most 256")
		}
	}
	return nil
}

// ValidateAddress accepts one bare email address (addr-spec, no display name, no comments)
// with a dotted DNS domain, at most 254 bytes.
func ValidateAddress(s string) error {
	if len(s) > 254 {
		return invalid(ReasonInvalidRecipient, "recipient", "longer than 254 bytes")
	}
	if strings.ContainsAny(s, "\r\n") {
		return invalid(ReasonHeaderInjection, "recipient", "contains CR or LF")
	}
	addr, err := mail.ParseAddress(s)
	if err != nil || addr.Name != "" || addr.Address != s {
		return invalid(ReasonInvalidRecipient, "recipient", "not a single bare email address")
	}
	at := strings.LastIndexByte(s, '@')
	local, domain := s[:at], s[at+1:]
	if len(local) > 64 || strings.HasPrefix(local, `"`) {
		return invalid(ReasonInvalidRecipient, "recipient", "local part must be an unquoted 1-64 byte atom")
	}
	// net/mail takes any non-ASCII character as atom text: spaces, controls and invisible
	// format characters would make addresses that look alike but key apart, and hide
	// pieces of an address from the redaction of failure text.
	for _, r := range local {
		if unicode.IsSpace(r) || unicode.IsControl(r) || unicode.Is(unicode.Cf, r) || !unicode.IsPrint(r) {
			return invalid(ReasonInvalidRecipient, "recipient", "local part must not hold spaces, control or invisible characters")
		}
	}
	labels := strings.Split(domain, ".")
	if len(labels) < 2 || len(domain) > 253 {
		return invalid(ReasonInvalidRecipient, "recipient", "domain must be a dotted DNS name")
	}
	for _, l := range labels {
		if !dnsLabelPattern.MatchString(l) {
			return invalid(ReasonInvalidRecipient, "recipient", "domain must be a dotted DNS name")
		}
	}
	return nil
}

// DecodeVerifyRequest strictly decodes and validates an otp.verify request body.
func DecodeVerifyRequest(data []byte) (VerifyRequest, error) {
	var r VerifyRequest
	if err := decodeStrict(data, MaxVerifyRequestSize, &r); err != nil {
		return VerifyRequest{}, err
	}
	switch {
	case r.RequestID == "":
		return VerifyRequest{}, invalid(ReasonMissingField, "request_id", "required")
	case r.Code == "":
		return VerifyRequest{}, invalid(ReasonMissingField, "code", "required")
	case !requestIDPattern.MatchString(r.RequestID):
		return VerifyRequest{}, invalid(ReasonInvalidField, "request_id", "must be 1-128 visible ASCII characters")
	case len(r.Code) > 16 || !utf8.ValidString(r.Code) || strings.ContainsAny(r.Code, "\r\n\x00"):
		return VerifyRequest{}, invalid(ReasonInvalidField, "code", "must be at most 16 characters")
	case len(r.Context.SessionID) > 128:
		return VerifyRequest{}, invalid(ReasonInvalidField, "context.session_id", "longer than 128 bytes")
	case r.Context.IP != "" && net.ParseIP(r.Context.IP) == nil:
		return VerifyRequest{}, invalid(ReasonInvalidField, "context.ip", "must be an IPv4 or IPv6 address")
	case len(r.Context.UserAgent) > 512:
		return VerifyRequest{}, invalid(ReasonInvalidField, "context.user_agent", "longer than 512 bytes")
	}
	for _, f := range []struct{ name, value string }{{"context.session_id", r.Context.SessionID}, {"context.user_agent", r.Context.UserAgent}} {
		if err := checkText(f.name, f.value); err != nil {
			return VerifyRequest{}, err
		}
	}
	return r, nil
}

// DecodeStatusRequest strictly decodes and validates an otp.status request body.
func DecodeStatusRequest(data []byte) (StatusRequest, error) {
	var r StatusRequest
	if err := decodeStrict(data, MaxVerifyRequestSize, &r); err != nil {
		return StatusRequest{}, err
	}
	switch {
	case r.RequestID == "":
		return StatusRequest{}, invalid(ReasonMissingField, "request_id", "required")
	case !requestIDPattern.MatchString(r.RequestID):
		return StatusRequest{}, invalid(ReasonInvalidField, "request_id", "must be 1-128 visible ASCII characters")
	}
	return r, nil
}

// checkText refuses text that is not UTF-8 or that carries CR, LF or NUL.
func checkText(field, s string) error {
	if strings.ContainsAny(s, "\r\n") {
		return invalid(ReasonHeaderInjection, field, "contains CR or LF")
	}
	if !utf8.ValidString(s) || strings.IndexByte(s, 0) >= 0 {
		return invalid(ReasonInvalidField, field, "must be UTF-8 text without NUL")
	}
	return nil
}

// decodeStrict decodes exactly one JSON object into v, refusing unknown fields and
// trailing data.
func decodeStrict(data []byte, limit int, v any) error {
	if len(data) > limit {
		return invalid(ReasonTooLarge, "", "body is %d bytes; the limit is %d", len(data), limit)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return invalid(ReasonMalformedJSON, "", "trailing data after the JSON object")
	}
	return nil
}

func jsonError(err error) error {
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case errors.As(err, &typeErr):
		field := typeErr.Field
		if field == "" {
			return invalid(ReasonMalformedJSON, "", "body must be a JSON object")
		}
		return invalid(ReasonInvalidField, field, "must be a JSON %s", jsonKind(typeErr.Type.Kind().String()))
	case errors.As(err, &syntaxErr), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return invalid(ReasonMalformedJSON, "", "not valid JSON")
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		name := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		if len(name) > 64 || !utf8.ValidString(name) || strings.ContainsFunc(name, unicode.IsControl) {
			name = "(unprintable)"
		} else if Reason(name, 64) != name {
			// otp.rejected names the field on the audit stream: an app that keyed an
			// object by address or IP must not put it there.
			name = "(redacted)"
		}
		return invalid(ReasonUnknownField, name, "not part of the contract")
	default:
		return invalid(ReasonMalformedJSON, "", "not valid JSON")
	}
}

func jsonKind(k string) string {
	switch k {
	case "int", "int64", "uint64", "float64":
		return "number"
	case "map", "struct":
		return "object"
	case "slice":
		return "array"
	case "bool":
		return "boolean"
	}
	return k
}

// MaxEventSize bounds the internal messages (dispatch jobs and OTP_EVENTS bodies).
const MaxEventSize = 64 << 10

// DecodeSealedDispatch decodes the wire body of otp.dispatch.<tenant>. It is strict: a job
// in the unsealed format of earlier releases, or with any field outside the seal besides
// the routing ones, is refused.
func DecodeSealedDispatch(data []byte) (SealedDispatch, error) {
	var d SealedDispatch
	if err := decodeStrict(data, MaxEventSize, &d); err != nil {
		return d, err
	}
	switch {
	case d.Format != DispatchFormat:
		return d, invalid(ReasonInvalidField, "format", "not a sealed dispatch job (%s); drain OTP_DISPATCH before an upgrade", DispatchFormat)
	case !tenantPattern.MatchString(d.Tenant):
		return d, invalid(ReasonInvalidTenant, "tenant", "must be 1-64 of [A-Za-z0-9_-]")
	case d.SealKeyID == "" || len(d.Sealed) == 0:
		return d, invalid(ReasonMissingField, "sealed", "required")
	}
	return d, nil
}

// DecodeSealedDeadLetter decodes the body of otp.dlq.<tenant>. It is strict: a dead
// letter written in the clear by an earlier release is refused.
func DecodeSealedDeadLetter(data []byte) (SealedDeadLetter, error) {
	var d SealedDeadLetter
	if err := decodeStrict(data, 8<<20, &d); err != nil {
		return d, err
	}
	switch {
	case d.Format != DeadLetterFormat:
		return d, invalid(ReasonInvalidField, "format", "not a sealed dead letter (%s)", DeadLetterFormat)
	case !tenantPattern.MatchString(d.Tenant):
		return d, invalid(ReasonInvalidTenant, "tenant", "must be 1-64 of [A-Za-z0-9_-]")
	case d.KeyID == "" || len(d.Sealed) == 0:
		return d, invalid(ReasonMissingField, "sealed", "required")
	}
	return d, nil
}

// DecodeDispatchJob decodes and checks a dispatch job once it is unsealed. Unknown fields
// are ignored, so an older dispatcher keeps working while a newer issuer extends the job.
func DecodeDispatchJob(data []byte) (DispatchJob, error) {
	var j DispatchJob
	if err := DecodeEvent(data, &j); err != nil {
		return j, err
	}
	switch {
	case !uuidPattern.MatchString(j.ChallengeID):
		return j, invalid(ReasonInvalidField, "challenge_id", "must be a UUID")
	case !tenantPattern.MatchString(j.Tenant):
		return j, invalid(ReasonInvalidTenant, "tenant", "must be 1-64 of [A-Za-z0-9_-]")
	case j.CodeSeq < 1:
		return j, invalid(ReasonInvalidField, "code_seq", "must be at least 1")
	case j.Code == "":
		return j, invalid(ReasonMissingField, "code", "required")
	case j.IssuedAt.IsZero() || j.ExpiresAt.IsZero() || !j.ExpiresAt.After(j.IssuedAt):
		return j, invalid(ReasonInvalidField, "expires_at", "must be after issued_at")
	}
	for _, f := range []struct{ name, value string }{{"request_id", j.RequestID}, {"purpose", j.Purpose}, {"locale", j.Locale}, {"code", j.Code}} {
		if err := checkText(f.name, f.value); err != nil {
			return j, err
		}
	}
	if err := ValidateAddress(j.Recipient); err != nil {
		return j, err
	}
	return j, nil
}

// DecodeEvent decodes an internal message body into v, ignoring unknown fields.
func DecodeEvent(data []byte, v any) error {
	if len(data) > MaxEventSize {
		return invalid(ReasonTooLarge, "", "body is %d bytes; the limit is %d", len(data), MaxEventSize)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return jsonError(err)
	}
	return nil
}
