// Package platform is the shared runtime plumbing of the otpflow services: configuration
// from the environment, connections to NATS and PostgreSQL, schema migrations, the batch
// consume loop, dead-lettering, and the /metrics, /healthz and /readyz endpoint. It holds
// no business rule.
package platform
