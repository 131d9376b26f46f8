// Command auditor runs one auditor process, configured by the environment (see README).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/auditor"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := platform.RunService(ctx, auditor.Spec(), os.Getenv, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "auditor:", err)
		os.Exit(1)
	}
}
