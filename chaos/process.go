package chaos

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Process is one binary run as an OS process of its own, its output appended to a log
// file. Like a container runtime it restarts the process when it exits on its own
// (after a second), and counts those restarts: a service that gives up on a dependency
// and exits is a finding, not a harness failure.
type Process struct {
	Name string
	Log  string

	bin  string
	args []string
	env  []string

	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{} // closed when cmd has exited
	killing  bool          // the exit in progress was asked for
	stopped  bool          // no restart after the next exit
	restarts int           // exits nobody asked for
}

// NewProcess prepares bin with args and the environment env ("K=V"), logging to log.
func NewProcess(name, bin string, args, env []string, log string) *Process {
	return &Process{Name: name, bin: bin, args: args, env: env, Log: log}
}

// Start starts the process.
func (p *Process) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopped = false
	return p.startLocked()
}

func (p *Process) startLocked() error {
	f, err := os.OpenFile(p.Log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(f, "=== %s start %s\n", p.Name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.killing = cmd, done, false
	go func() {
		err := cmd.Wait()
		f.Close()
		close(done)
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.cmd != cmd || p.killing || p.stopped {
			return
		}
		p.restarts++
		go p.restartLater(cmd, err)
	}()
	return nil
}

// restartLater starts the process again a second after it exited on its own (err).
func (p *Process) restartLater(exited *exec.Cmd, err error) {
	if f, ferr := os.OpenFile(p.Log, os.O_APPEND|os.O_WRONLY, 0o644); ferr == nil {
		fmt.Fprintf(f, "=== %s exited on its own (%v); restarting in 1s\n", p.Name, err)
		f.Close()
	}
	time.Sleep(time.Second) // a supervisor's restart delay, not a wait for a condition
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == exited && !p.stopped {
		_ = p.startLocked()
	}
}

// Kill sends SIGKILL and waits until the process is gone. It is not restarted until
// Start is called.
func (p *Process) Kill() error { return p.signal(syscall.SIGKILL) }

// Stop sends SIGTERM and waits until the process has exited (it drains first).
func (p *Process) Stop() error { return p.signal(syscall.SIGTERM) }

func (p *Process) signal(sig syscall.Signal) error {
	p.mu.Lock()
	p.stopped, p.killing = true, true
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	default:
	}
	if err := cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("signal %s: %w", p.Name, err)
	}
	select {
	case <-done:
		return nil
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("%s did not exit within 60s of %v", p.Name, sig)
	}
}

// Restarts is how often the process exited without being asked to.
func (p *Process) Restarts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.restarts
}
