package deploy

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func TestDockerfile(t *testing.T) {
	report(t, checkDockerfile(loadFiles(t)))
}

// checkDockerfile checks deploy/Dockerfile: a build stage with the Makefile's toolchain
// that copies every workspace module and builds every binary static and trimmed, and a
// minimal final stage that runs as a numeric non-root user.
func checkDockerfile(f files) []error {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, errorf("Dockerfile: "+format, args...)) }
	// Instructions only: a comment that mentions a flag does not set it.
	df := regexp.MustCompile(`(?m)^\s*#.*\n`).ReplaceAllString(f["Dockerfile"], "")
	args := map[string]string{}
	for _, m := range regexp.MustCompile(`(?m)^ARG (\w+)=(\S+)$`).FindAllStringSubmatch(df, -1) {
		args[m[1]] = m[2]
	}
	var froms []string
	for _, m := range regexp.MustCompile(`(?m)^FROM (\S+)`).FindAllStringSubmatch(df, -1) {
		img := m[1]
		if a := regexp.MustCompile(`^\$\{(\w+)\}$`).FindStringSubmatch(img); a != nil {
			img = args[a[1]]
		}
		froms = append(froms, img)
	}
	if len(froms) < 2 {
		fail("%d stages; want a build stage and a runtime stage", len(froms))
		return errs
	}
	if !strings.HasPrefix(froms[0], "golang:") {
		fail("build stage %q is not a golang image", froms[0])
	}
	final := froms[len(froms)-1]
	if !strings.HasPrefix(final, "gcr.io/distroless/static") && final != "scratch" {
		fail("runtime stage %q is neither distroless static nor scratch", final)
	}

	want := regexp.MustCompile(`(?m)^export GOTOOLCHAIN := *(\S+)`).FindStringSubmatch(f["../Makefile"])
	got := regexp.MustCompile(`GOTOOLCHAIN=(\S+)`).FindStringSubmatch(df)
	if want == nil || got == nil || got[1] != want[1] {
		fail("GOTOOLCHAIN %v is not the Makefile's %v", got, want)
	}
	if !strings.Contains(df, "CGO_ENABLED=0") {
		fail("CGO_ENABLED=0 missing: the binaries must be static for a distroless static image")
	}
	if !strings.Contains(df, "-trimpath") {
		fail("-trimpath missing")
	}
	build := regexp.MustCompile(`(?s)go build .*?\n\s*\n`).FindString(df + "\n\n")
	for _, pkg := range []string{"./services/issuer/cmd/issuer", "./services/dispatcher/cmd/dispatcher",
		"./services/verifier/cmd/verifier", "./services/auditor/cmd/auditor", "./cmd/otpflow", "./deploy/probe"} {
		if !strings.Contains(build, pkg+" ") && !strings.Contains(build, pkg+"\n") {
			fail("go build does not build %s", pkg)
		}
	}
	// go mod download in workspace mode needs every module's go.mod in the layer.
	for _, m := range regexp.MustCompile(`(?m)^\s+\./(\S+)$`).FindAllStringSubmatch(f["../go.work"], -1) {
		if !strings.Contains(df, "COPY "+m[1]+"/go.mod "+m[1]+"/go.sum "+m[1]+"/") {
			fail("does not copy %s/go.mod before go mod download", m[1])
		}
	}
	users := regexp.MustCompile(`(?m)^USER (\S+)$`).FindAllStringSubmatch(df, -1)
	if len(users) == 0 {
		fail("no USER: the image would run as root")
	} else {
		u := users[len(users)-1][1]
		uid, err := strconv.Atoi(strings.Split(u, ":")[0])
		if err != nil || uid == 0 {
			fail("USER %s is not a numeric non-root UID (runAsNonRoot cannot verify a name)", u)
		} else if uid != imageUID {
			fail("USER %d is not %d, the UID compose and the manifests run as", uid, imageUID)
		}
		if strings.LastIndex(df, "USER ") < strings.LastIndex(df, "FROM ") {
			fail("USER is set before the runtime stage, which starts as root")
		}
	}
	return errs
}
