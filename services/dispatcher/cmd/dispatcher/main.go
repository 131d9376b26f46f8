// Command dispatcher runs one dispatcher process, configured by the environment (see README).
package main

import (
	"github.com/otpflow/otpflow/platform"
	"github.com/otpflow/otpflow/services/dispatcher"
)

func main() { platform.Main(dispatcher.Spec()) }
