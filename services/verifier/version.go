package verifier

import (
	"regexp"
	"runtime/debug"
	"strings"
)

// semver is the form the micro service's version must take (the micro package refuses
// anything else).
var semver = regexp.MustCompile(`^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$`)

// develVersion is reported by a build that carries neither a module version nor a VCS
// revision (go test, go run of a dirty copy without VCS stamping).
const develVersion = "0.0.0-devel"

// Version is the version the verifier reports in its micro service's INFO and PING: the
// build's, not a constant.
func Version() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return develVersion
	}
	return versionOf(info)
}

// versionOf reads the version from build info: the main module's version when it was
// built as a module at a tag (v1.2.3 → 1.2.3), else the VCS revision that `go build`
// stamps into a (devel) build (0.0.0-devel+<revision>[.dirty]), else 0.0.0-devel.
func versionOf(info *debug.BuildInfo) string {
	if v := strings.TrimPrefix(info.Main.Version, "v"); v != "" && v != "(devel)" && semver.MatchString(v) {
		return v
	}
	var rev string
	var dirty bool
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return develVersion
	}
	v := develVersion + "+" + rev
	if dirty {
		v += ".dirty"
	}
	if !semver.MatchString(v) {
		return develVersion
	}
	return v
}
