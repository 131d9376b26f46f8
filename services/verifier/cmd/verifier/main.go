// Command verifier runs one verifier process, configured by the environment (see README).
package main

import (
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/verifier"
)

func main() { platform.Main(verifier.Spec()) }
