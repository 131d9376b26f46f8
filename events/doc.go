// Package events is the otpflow contract: the NATS subjects, the JetStream streams and
// durable consumers, the payload of every message, and the CloudEvents headers they carry.
//
// Everything another program may depend on lives here. Subjects and durable consumer names
// are stable: renaming a durable consumer replays its stream from the start. Payloads only
// grow by extension; the JSON Schemas in schema/ are generated from these types and a test
// keeps them in step.
//
// Subjects are "otp.<type>.<tenant>": the tenant is always the last token. Every message is
// published with a Nats-Msg-Id derived deterministically from what it describes, so a
// publisher that retries after a crash re-publishes the same id and the stream's duplicate
// window drops the copy.
package events
