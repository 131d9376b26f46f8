package verifier

import (
	"encoding/json"
	"runtime/debug"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/otpflow/otpflow/platform/testenv"
)

func TestVersionOf(t *testing.T) {
	vcs := func(rev, modified string) []debug.BuildSetting {
		return []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}
	}
	for _, tc := range []struct {
		name string
		info debug.BuildInfo
		want string
	}{
		{"a tagged module build", debug.BuildInfo{Main: debug.Module{Version: "v1.4.2"}}, "1.4.2"},
		{"a pseudo-version", debug.BuildInfo{Main: debug.Module{Version: "v0.0.0-20260101120000-0123456789ab"}}, "0.0.0-20260101120000-0123456789ab"},
		{"a devel build from git", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: vcs("4f2a9c0d", "false")}, "0.0.0-devel+4f2a9c0d"},
		{"a devel build with local changes", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: vcs("4f2a9c0d", "true")}, "0.0.0-devel+4f2a9c0d.dirty"},
		{"no version, no VCS", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, develVersion},
		{"nothing at all", debug.BuildInfo{}, develVersion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := versionOf(&tc.info); got != tc.want {
				t.Fatalf("versionOf = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestServiceReportsTheBuildVersion: the micro service's INFO and PING carry the version
// read from the build, not a constant.
func TestServiceReportsTheBuildVersion(t *testing.T) {
	h := newHarness(t)
	for _, subject := range []string{"$SRV.INFO.otp-verifier", "$SRV.PING.otp-verifier"} {
		msg, err := h.nc.Request(subject, nil, 5*time.Second)
		testenv.Must(t, err, "%s", subject)
		var info micro.Info
		testenv.Must(t, json.Unmarshal(msg.Data, &info), "decode %s", subject)
		if info.Version != Version() || info.Version == "" || info.Version == "1.0.0" {
			t.Fatalf("%s reports version %q, want the build's %q", subject, info.Version, Version())
		}
	}
}
