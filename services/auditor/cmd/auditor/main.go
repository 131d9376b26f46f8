// Command auditor runs one auditor process, configured by the environment (see README).
package main

import (
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/auditor"
)

func main() { platform.Main(auditor.Spec()) }
