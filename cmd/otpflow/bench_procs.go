package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// benchProc is one service the bench runs from its binary.
type benchProc struct {
	name    string // issuer, dispatcher-2, ...
	binary  string // issuer, dispatcher, ...
	cmd     *exec.Cmd
	opsAddr string
	logPath string
	exited  chan struct{}
	waitErr error
	cpu0    float64 // CPU seconds when the measured load began
}

// startBenchProc starts binary from binDir as name with env added to this process's
// environment, its output in logDir/name.log, and its ops endpoint on a free loopback port.
func startBenchProc(binDir, binary, name, logDir string, env map[string]string) (*benchProc, error) {
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	p := &benchProc{name: name, binary: binary, opsAddr: addr, logPath: filepath.Join(logDir, name+".log"), exited: make(chan struct{})}
	logf, err := os.Create(p.logPath)
	if err != nil {
		return nil, err
	}
	p.cmd = exec.Command(filepath.Join(binDir, binary))
	p.cmd.Env = os.Environ()
	for k, v := range env {
		p.cmd.Env = append(p.cmd.Env, k+"="+v)
	}
	p.cmd.Env = append(p.cmd.Env, "OTP_HTTP_ADDR="+addr)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	dieWithParent(p.cmd)
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	return p, nil
}

// ready waits until the process answers /readyz with 200, failing if it exits first.
func (p *benchProc) ready(ctx context.Context, within time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.opsAddr+"/readyz", nil)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before it was ready (%v):\n%s", p.name, p.waitErr, p.logTail())
		case <-ctx.Done():
			return fmt.Errorf("%s not ready within %v:\n%s", p.name, within, p.logTail())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// logTail is the last lines the process wrote.
func (p *benchProc) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return "  " + strings.Join(lines, "\n  ")
}

// stop sends SIGTERM and waits for the drain, then kills what is left.
func (p *benchProc) stop(within time.Duration) {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(within):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// profile saves the process's profile kind (pprof's "profile" for CPU, "allocs", ...) to
// path; query is the profile's URL query, e.g. "seconds=20".
func (p *benchProc) profile(ctx context.Context, kind, query, path string) error {
	url := "http://" + p.opsAddr + "/debug/pprof/" + kind
	if query != "" {
		url += "?" + query
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("%s profile of %s: %w", kind, p.name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s profile of %s: %s: %s", kind, p.name, resp.Status, bytes.TrimSpace(b))
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// procUsage reads a process's CPU seconds (user and system) and peak resident set from
// /proc. ok is false where /proc does not say (not Linux, or the process is gone).
func procUsage(pid int) (cpuSeconds, peakRSSMB float64, ok bool) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, false
	}
	// The command name (field 2) may hold spaces; the fields after it follow its ")".
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, 0, false
	}
	utime, err1 := strconv.ParseFloat(f[11], 64) // field 14
	stime, err2 := strconv.ParseFloat(f[12], 64) // field 15
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	const clockTicks = 100 // USER_HZ, 100 on every Linux the services build for
	cpuSeconds = (utime + stime) / clockTicks
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return cpuSeconds, 0, false
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, found := strings.CutPrefix(line, "VmHWM:"); found {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				return cpuSeconds, 0, false
			}
			return cpuSeconds, kb / 1024, true
		}
	}
	return cpuSeconds, 0, false
}

// freeLoopbackAddr is a loopback address with a port no one listens on now.
func freeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

// findBinaries checks that binDir holds every service binary.
func findBinaries(binDir string) error {
	for _, name := range []string{"issuer", "dispatcher", "verifier", "auditor"} {
		st, err := os.Stat(filepath.Join(binDir, name))
		if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			return fmt.Errorf("no %s binary in %s: run make build, or name the folder with -bin", name, binDir)
		}
	}
	return nil
}

// defaultBinDir is the folder of this executable: bin/ after make build.
func defaultBinDir() string {
	exe, err := os.Executable()
	if err != nil {
		return "bin"
	}
	if resolved, err := filepath.EvalSymlinks(exe); err == nil {
		exe = resolved
	}
	return filepath.Dir(exe)
}

// errStalled: no request reached an outcome for the settle time.
var errStalled = errors.New("stalled")

// postgresCPU reads the CPU seconds of every process named postgres on this machine
// (nothing when the server runs elsewhere), by pid.
func postgresCPU() map[int]float64 {
	out := map[int]float64{}
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || strings.TrimSpace(string(comm)) != "postgres" {
			continue
		}
		if cpu, _, ok := procUsage(pid); ok {
			out[pid] = cpu
		}
	}
	return out
}
