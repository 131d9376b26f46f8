package events

import (
	"fmt"
	"regexp"
	"strings"
)

// Type names one kind of message. It is the subject prefix ("otp.issued") and the
// CloudEvents ce-type of the message.
type Type string

// The message types of the contract. Each is published on "<type>.<tenant>".
const (
	TypeRequested       Type = "otp.requested"
	TypeDispatch        Type = "otp.dispatch"
	TypeIssued          Type = "otp.issued"
	TypeRejected        Type = "otp.rejected"
	TypeSuperseded      Type = "otp.superseded"
	TypeDelivered       Type = "otp.delivered"
	TypeDeliveryFailed  Type = "otp.delivery_failed"
	TypeDispatchExpired Type = "otp.dispatch_expired"
	TypeVerified        Type = "otp.verified"
	TypeVerifyFailed    Type = "otp.verify_failed"
	TypeLocked          Type = "otp.locked"
	TypeAlert           Type = "otp.alert"
	TypeDLQ             Type = "otp.dlq"
	// TypeVerify is the request/reply subject prefix of the verify service.
	TypeVerify Type = "otp.verify"
)

// EventTypes are the types stored on the OTP_EVENTS stream, the audit stream.
var EventTypes = []Type{
	TypeIssued, TypeRejected, TypeSuperseded, TypeDelivered, TypeDeliveryFailed,
	TypeDispatchExpired, TypeVerified, TypeVerifyFailed, TypeLocked, TypeAlert,
}

// Subject returns the subject of a message of type t for tenant, e.g. "otp.issued.acme".
func (t Type) Subject(tenant string) string { return string(t) + "." + tenant }

// Wildcard returns the subject filter that matches type t for every tenant.
func (t Type) Wildcard() string { return string(t) + ".*" }

var tenantPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidTenant reports whether s may be used as a tenant token: 1 to 64 characters of
// [A-Za-z0-9_-], which keeps it a single, wildcard-free subject token.
func ValidTenant(s string) bool { return tenantPattern.MatchString(s) }

// SplitSubject splits a contract subject into its type and tenant. It fails with a
// *ValidationError of reason ReasonInvalidTenant when the tenant token is not valid.
func SplitSubject(subject string) (Type, string, error) {
	i := strings.LastIndexByte(subject, '.')
	if i <= 0 {
		return "", "", &ValidationError{Reason: ReasonInvalidTenant, Field: "subject", Detail: fmt.Sprintf("subject %q has no tenant token", subject)}
	}
	typ, tenant := Type(subject[:i]), subject[i+1:]
	if !ValidTenant(tenant) {
		return typ, "", &ValidationError{Reason: ReasonInvalidTenant, Field: "subject", Detail: "tenant token must be 1-64 characters of [A-Za-z0-9_-]"}
	}
	return typ, tenant, nil
}
