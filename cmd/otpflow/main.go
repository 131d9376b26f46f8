// Command otpflow is the developer launcher and operator CLI:
//
//	otpflow dev                      the whole pipeline in one process (embedded NATS, sandbox mail)
//	otpflow migrate                  as an administrator: roles, schemas, migrations, grants
//	otpflow request -tenant T -request-id ID -recipient ADDR -purpose P
//	otpflow verify  -tenant T -request-id ID -code CODE
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `usage: otpflow <command> [flags]

commands:
  dev       run NATS (embedded), all four services and the sandbox mailbox in one process
  migrate   create the database roles and schemas, migrate them and grant each service its rights
  request   publish an otp.requested event, as an upstream app does
  verify    ask otp.verify whether a code is right
  audit     verify, replay, trail, erase and purge the audit log
  provision create or update the streams and consumers, and migrate the database (an admin's job)
  erase     erase one person of a tenant from every service, stream and the audit log
  dlq       list, show, redrive and drop the dead letters of OTP_DLQ
  suppression list, add and remove the recipients a tenant no longer mails (bounced, complained)
  bench     run the services from bin/ as processes and load them as an app does: throughput, latency, losses, CPU, memory

run "otpflow <command> -h" for the flags of a command.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	code, err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "otpflow:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// run executes one command and returns the process exit code.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) (int, error) {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2, nil
	}
	var err error
	switch args[0] {
	case "dev":
		err = devCommand(ctx, args[1:], getenv, stdout, stderr)
	case "migrate":
		err = migrateCommand(ctx, args[1:], getenv, stdout)
	case "provision":
		err = provisionCommand(ctx, args[1:], getenv, stdout)
	case "request":
		err = requestCommand(ctx, args[1:], getenv, stdout)
	case "verify":
		var verified bool
		verified, err = verifyCommand(ctx, args[1:], getenv, stdout)
		if err == nil && !verified {
			return 3, nil
		}
	case "audit":
		code, err := auditCommand(ctx, args[1:], getenv, stdout, stderr)
		if errors.Is(err, flag.ErrHelp) {
			return 0, nil
		}
		return code, err
	case "erase":
		code, err := eraseCommand(ctx, args[1:], getenv, stdout)
		if errors.Is(err, flag.ErrHelp) {
			return 0, nil
		}
		return code, err
	case "dlq":
		code, err := dlqCommand(ctx, args[1:], getenv, stdout, stderr)
		if errors.Is(err, flag.ErrHelp) {
			return 0, nil
		}
		return code, err
	case "suppression":
		code, err := suppressionCommand(ctx, args[1:], getenv, stdout, stderr)
		if errors.Is(err, flag.ErrHelp) {
			return 0, nil
		}
		return code, err
	case "bench":
		err = benchCommand(ctx, args[1:], getenv, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0, nil
	default:
		fmt.Fprint(stderr, usage)
		return 2, fmt.Errorf("unknown command %q", args[0])
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0, nil
	}
	return 0, err
}
