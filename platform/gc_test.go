package platform

import (
	"math"
	"runtime/debug"
	"testing"
)

// TestGCDefaults: a service binary without GOGC and GOMEMLIMIT collects at DefaultGOGC
// within DefaultMemoryLimit; with either set, the runtime's settings are left alone.
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

	// Either set in the environment: the runtime read it at start, and neither default
	// applies (an operator who sets GOGC=100 gets Go's behaviour back, with no limit).
	for _, env := range []map[string]string{{"GOGC": "150"}, {"GOMEMLIMIT": "1GiB"}} {
		debug.SetGCPercent(150)
		debug.SetMemoryLimit(math.MaxInt64)
		gcDefaults(func(k string) string { return env[k] })
		if got := debug.SetGCPercent(100); got != 150 {
			t.Errorf("with %v: GOGC %d, want 150 as it was", env, got)
		}
		if got := debug.SetMemoryLimit(-1); got != math.MaxInt64 {
			t.Errorf("with %v: memory limit %d, want none as it was", env, got)
		}
	}
}
