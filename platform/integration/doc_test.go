// Package platform_test holds the tests of platform that need real servers (NATS,
// PostgreSQL, TLS): a module of its own, so that platform's go.mod requires no test
// server.
package platform_test
