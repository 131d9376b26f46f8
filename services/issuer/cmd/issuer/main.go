// Command issuer runs one issuer process, configured by the environment (see README).
package main

import (
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/issuer"
)

func main() { platform.Main(issuer.Spec()) }
