package platform

import (
	"math"
	"runtime/debug"
	"testing"
)

// TestGCDefaults: a service binary without GOGC and GOMEMLIMIT collects at DefaultGOGC
// within DefaultMemoryLimit; what the environment sets is left to the runtime.
func TestGCDefaults(t *testing.T) {
	gogc, limit := debug.SetGCPercent(100), debug.SetMemoryLimit(math.MaxInt64)
	t.Cleanup(func() { debug.SetGCPercent(gogc); debug.SetMemoryLimit(limit) })

	gcDefaults(func(string) string { return "" })
	if got := debug.SetGCPercent(100); got != DefaultGOGC {
		t.Errorf("GOGC %d, want %d", got, DefaultGOGC)
	}
	if got := debug.SetMemoryLimit(-1); got != DefaultMemoryLimit {
		t.Errorf("memory limit %d, want %d", got, DefaultMemoryLimit)
	}

	// Set in the environment: the runtime read them at start; they stay as it set them.
	debug.SetGCPercent(150)
	debug.SetMemoryLimit(1 << 30)
	gcDefaults(func(k string) string { return map[string]string{"GOGC": "150", "GOMEMLIMIT": "1GiB"}[k] })
	if got := debug.SetGCPercent(100); got != 150 {
		t.Errorf("GOGC %d, want the environment's 150", got)
	}
	if got := debug.SetMemoryLimit(-1); got != 1<<30 {
		t.Errorf("memory limit %d, want the environment's 1 GiB", got)
	}
}
