package chaos_test

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/otpflow/otpflow/chaos"
)

var (
	buildOnce sync.Once
	bins      chaos.Bins
	buildErr  error
)

// binaries builds the binaries under test once per run, from this checkout.
func binaries(t *testing.T) chaos.Bins {
	t.Helper()
	buildOnce.Do(func() {
		start := time.Now()
		bins, buildErr = chaos.Build("..")
		t.Logf("built the binaries in %v", time.Since(start).Round(time.Millisecond))
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return bins
}

func TestMain(m *testing.M) {
	code := m.Run()
	if bins.Dir != "" {
		os.RemoveAll(bins.Dir)
	}
	os.Exit(code)
}

// TestShort is the fault suite's short version, part of `make test`: kill -9 of the
// issuer, the verifier and the auditor in turn under a small steady load, every
// invariant checked after.
func TestShort(t *testing.T) {
	if os.Getenv("OTP_CHAOS") == "1" {
		t.Skip("make chaos runs the whole suite (TestChaos)")
	}
	start := time.Now()
	row := chaos.Short().Run(t, binaries(t))
	report(t, []chaos.Row{row})
	t.Logf("short fault suite: %v", time.Since(start).Round(time.Second))
}

// TestChaos is `make chaos`: every scenario, one environment each, then the table.
// OTP_CHAOS=1 turns it on; OTP_CHAOS_RUN, a regular expression, picks scenarios by name;
// OTP_CHAOS_REPORT names a file to write the table to as Markdown.
func TestChaos(t *testing.T) {
	if os.Getenv("OTP_CHAOS") != "1" {
		t.Skip("the whole fault suite takes about twelve minutes: make chaos (OTP_CHAOS=1)")
	}
	pick := regexp.MustCompile(os.Getenv("OTP_CHAOS_RUN"))
	b := binaries(t)
	var rows []chaos.Row
	for _, sc := range chaos.Scenarios() {
		if !pick.MatchString(sc.Name) {
			continue
		}
		t.Run(sc.Name, func(t *testing.T) {
			rows = append(rows, sc.Run(t, b))
		})
	}
	report(t, rows)
}

// report prints the table on standard output, where `make chaos` shows it, and writes
// it as Markdown to OTP_CHAOS_REPORT if set.
func report(t *testing.T, rows []chaos.Row) {
	var buf bytes.Buffer
	chaos.WriteTable(&buf, rows)
	fmt.Printf("\n%s\n", buf.String())
	if path := os.Getenv("OTP_CHAOS_REPORT"); path != "" {
		var md bytes.Buffer
		chaos.Markdown(&md, rows)
		md.WriteString("\n```\n" + buf.String() + "```\n")
		if err := os.WriteFile(path, md.Bytes(), 0o644); err != nil {
			t.Errorf("write %s: %v", path, err)
		}
	}
}
