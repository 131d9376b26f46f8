package platform

import "runtime/debug"

// The garbage collector's settings for a service binary when its environment sets
// neither GOGC nor GOMEMLIMIT (the Go runtime's own variables; an operator who sets
// either has chosen, and neither default applies). A service keeps a small live heap,
// tens of MB, and allocates for every message it handles: the profiles under load showed
// the collector's mark workers alone at 10–13 % of the auditor's and the verifier's CPU.
// The heap may grow to five times what is live before a collection, and the memory limit
// bounds it: near DefaultMemoryLimit the runtime collects as often as it must, spending at
// most about half the CPU on it (docs/performance.md; the manifests' containers are
// limited to 256 MiB and more).
const (
	DefaultGOGC        = 400
	DefaultMemoryLimit = 128 << 20
)

// gcDefaults applies DefaultGOGC and DefaultMemoryLimit unless getenv sets GOGC or
// GOMEMLIMIT.
func gcDefaults(getenv Getenv) {
	if getenv("GOGC") != "" || getenv("GOMEMLIMIT") != "" {
		return
	}
	debug.SetGCPercent(DefaultGOGC)
	debug.SetMemoryLimit(DefaultMemoryLimit)
}
