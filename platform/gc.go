package platform

import "runtime/debug"

// The garbage collector's settings for a service binary when its environment sets none
// (GOGC, GOMEMLIMIT: the Go runtime's own variables, which win). A service keeps a small
// live heap, tens of MB, and allocates for every message it handles: with Go's default
// (GOGC=100) collection took a quarter of each service's CPU under load. The heap may grow
// to five times what is live before a collection, and the memory limit bounds it: past
// DefaultMemoryLimit the runtime collects as often as it must, spending at most half the
// CPU on it (docs/performance.md; the manifests' containers are limited to 256 MiB and
// more).
const (
	DefaultGOGC        = 400
	DefaultMemoryLimit = 128 << 20
)

// gcDefaults applies DefaultGOGC and DefaultMemoryLimit where getenv sets no GOGC or
// GOMEMLIMIT.
func gcDefaults(getenv Getenv) {
	if getenv("GOGC") == "" {
		debug.SetGCPercent(DefaultGOGC)
	}
	if getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(DefaultMemoryLimit)
	}
}
