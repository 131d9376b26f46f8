// Package platform is the shared runtime plumbing of the otpflow services: configuration
// from the environment, connections to NATS and PostgreSQL, schema migrations, the batch
// consume loop, dead-lettering, stream provisioning, the /metrics, /healthz and /readyz
// endpoint, and the runner that starts every service the same way (RunService). It holds
// no business rule.
package platform
