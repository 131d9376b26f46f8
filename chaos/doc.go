// Package chaos is otpflow's fault suite: it runs the real binaries (issuer, dispatcher,
// verifier, auditor, otpflow, and a nats-server built from the pinned module version) as
// separate processes against a PostgreSQL cluster of its own, drives a steady load of
// otp.requested as a third-party app would, injects one fault per scenario (kill -9, a
// PostgreSQL or NATS restart, a stream leader's death, provider outages, slow and hanging
// providers), and then checks the pipeline's promises from the OTP_EVENTS stream, the
// mail sinks, the verify service and the audit log. See README.md and docs/reliability.md.
//
// The package is imported only by its own tests; nothing in a production build links it.
package chaos
