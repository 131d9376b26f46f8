package ses_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

// emulatorVersion is the aws-ses-v2-local release the test installs.
const emulatorVersion = "2.10.2"

// startEmulator installs aws-ses-v2-local from npm into a cache folder outside the
// repository (no lock file is written) and runs it on a free loopback port.
func startEmulator(t *testing.T) string {
	t.Helper()
	npm, err := exec.LookPath("npm")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("npm is required to run the SES v2 emulator in CI")
		}
		t.Skip("npm not installed: cannot run the SES v2 emulator")
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "otpflow-test", "aws-ses-v2-local-"+emulatorVersion)
	cli := filepath.Join(dir, "node_modules", "aws-ses-v2-local", "dist", "cli.js")
	if _, err := os.Stat(cli); err != nil {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, npm, "install", "--no-save", "--no-package-lock", "--no-audit", "--no-fund",
			"--prefix", dir, "aws-ses-v2-local@"+emulatorVersion)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("npm install aws-ses-v2-local: %v\n%s", err, out)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	cmd := exec.Command("node", cli, "--host", "127.0.0.1", "--port", strconv.Itoa(port))
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start emulator: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	base := "http://127.0.0.1:" + strconv.Itoa(port)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(base + "/health-check")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return base
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("emulator did not answer: %v\n%s", err, logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAgainstTheSESv2Emulator sends with the real SDK to aws-ses-v2-local. The emulator
// stores from, to, subject, bodies and headers; it does not keep tags, so a recording
// proxy in front of it reads the tags from the request as the SDK sent it.
func TestAgainstTheSESv2Emulator(t *testing.T) {
	emu := startEmulator(t)
	target, _ := url.Parse(emu)
	var mu sync.Mutex
	var bodies [][]byte
	proxy := httputil.NewSingleHostReverseProxy(target)
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, b)
		mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(b))
		proxy.ServeHTTP(w, r)
	}))
	defer front.Close()

	rcpt, err := provider(t, front.URL, 5*time.Second).Send(context.Background(), message())
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	resp, err := http.Get(emu + "/store")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var store struct {
		Emails []struct {
			MessageID   string `json:"messageId"`
			From        string `json:"from"`
			Destination struct {
				To []string `json:"to"`
			} `json:"destination"`
			Subject string `json:"subject"`
			Body    struct {
				Text string `json:"text"`
				HTML string `json:"html"`
			} `json:"body"`
			Headers []struct{ Name, Value string } `json:"headers"`
		} `json:"emails"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&store); err != nil {
		t.Fatal(err)
	}
	if len(store.Emails) != 1 {
		t.Fatalf("emulator holds %d mails", len(store.Emails))
	}
	e := store.Emails[0]
	if e.MessageID != rcpt.MessageID || e.From != "Acme <no-reply@acme.example>" || len(e.Destination.To) != 1 ||
		e.Destination.To[0] != "ana@example.com" || e.Subject != "Your verification code: 493027" ||
		e.Body.Text != "code 493027" || e.Body.HTML != "<p>493027</p>" {
		t.Fatalf("stored mail = %+v (receipt %s)", e, rcpt.MessageID)
	}
	if len(e.Headers) != 1 || e.Headers[0].Name != "X-Otp-Challenge-Id" || e.Headers[0].Value != "c-1" {
		t.Fatalf("headers = %+v", e.Headers)
	}

	mu.Lock()
	defer mu.Unlock()
	var sent struct {
		EmailTags            []struct{ Name, Value string }
		ConfigurationSetName string
	}
	if len(bodies) != 1 || json.Unmarshal(bodies[0], &sent) != nil {
		t.Fatalf("requests seen: %d", len(bodies))
	}
	tags := map[string]string{}
	for _, tg := range sent.EmailTags {
		tags[tg.Name] = tg.Value
	}
	if tags["tenant"] != "acme" || tags["purpose"] != "login_v2" || tags["challenge_id"] != "2eedf1ad-5135-4c42-a28f-5b09316ec196" || sent.ConfigurationSetName != "otp" {
		t.Fatalf("tags %v, configuration set %q", tags, sent.ConfigurationSetName)
	}
}
