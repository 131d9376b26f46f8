package main

import (
	"os/exec"
	"syscall"
)

// dieWithParent has the kernel stop a service the bench started when the bench itself
// dies (killed, or crashed), so no service outlives its run.
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
