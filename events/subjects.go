package events

import (
	"errors"
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
	// TypeFeedback is what a mail provider reported about a mail after it accepted it.
	TypeFeedback       Type = "otp.feedback"
	TypeOperatorAction Type = "otp.operator_action"
	// TypeErasureRequested asks every service to erase one person; TypeErased is each
	// service's answer that it has.
	TypeErasureRequested Type = "otp.erasure_requested"
	TypeErased           Type = "otp.erased"
	TypeDLQ              Type = "otp.dlq"
	// TypeChallenge and TypeChallengeSuperseded are the verifier's feed on OTP_CHALLENGES.
	TypeChallenge           Type = "otp.challenge"
	TypeChallengeSuperseded Type = "otp.challenge_superseded"
	// TypeVerify is the request/reply subject prefix of the verify service.
	TypeVerify Type = "otp.verify"
	// TypeStatus is the request/reply subject prefix of the status service: what became
	// of a request (StatusRequest, StatusReply).
	TypeStatus Type = "otp.status"
)

// EventTypes are the types stored on the OTP_EVENTS stream, the audit stream. Adding one:
// its payload in payloads.go, its case in DecodeEventOf, a golden value and a schema.
var EventTypes = []Type{
	TypeIssued, TypeRejected, TypeSuperseded, TypeDelivered, TypeDeliveryFailed,
	TypeDispatchExpired, TypeVerified, TypeVerifyFailed, TypeLocked, TypeAlert, TypeOperatorAction,
	TypeErasureRequested, TypeErased, TypeFeedback,
}

// ChallengeTypes are the types stored on the OTP_CHALLENGES stream, the verifier's own:
// Challenge for TypeChallenge, Superseded for TypeChallengeSuperseded. One stream carries
// both, so the verifier learns of a challenge and of its supersession in one order.
var ChallengeTypes = []Type{TypeChallenge, TypeChallengeSuperseded}

// ErrUnknownType is returned by DecodeEventOf for a type this version of the contract does
// not know, such as one a newer producer added. A consumer that must keep every event (the
// auditor) stores such a body as it came.
var ErrUnknownType = errors.New("event type unknown to this version of the contract")

// DecodeEventOf decodes an OTP_EVENTS body of type t into its payload, returned by value:
// Issued for TypeIssued, Rejected for TypeRejected, and so on for each of EventTypes. Like
// DecodeEvent it ignores unknown fields, so what a newer producer adds passes. A type
// outside EventTypes fails with ErrUnknownType.
func DecodeEventOf(t Type, data []byte) (any, error) {
	switch t {
	case TypeIssued:
		return decodeAs[Issued](data)
	case TypeRejected:
		return decodeAs[Rejected](data)
	case TypeSuperseded:
		return decodeAs[Superseded](data)
	case TypeDelivered:
		return decodeAs[Delivered](data)
	case TypeDeliveryFailed:
		return decodeAs[DeliveryFailed](data)
	case TypeDispatchExpired:
		return decodeAs[DispatchExpired](data)
	case TypeVerified:
		return decodeAs[Verified](data)
	case TypeVerifyFailed:
		return decodeAs[VerifyFailed](data)
	case TypeLocked:
		return decodeAs[Locked](data)
	case TypeAlert:
		return decodeAs[Alert](data)
	case TypeOperatorAction:
		return decodeAs[OperatorAction](data)
	case TypeErasureRequested:
		return decodeAs[ErasureRequested](data)
	case TypeErased:
		return decodeAs[Erased](data)
	case TypeFeedback:
		return decodeAs[Feedback](data)
	}
	return nil, fmt.Errorf("%w: %s", ErrUnknownType, t)
}

func decodeAs[T any](data []byte) (any, error) {
	var v T
	if err := DecodeEvent(data, &v); err != nil {
		return nil, err
	}
	return v, nil
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
