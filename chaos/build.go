package chaos

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Bins is where the binaries under test are.
type Bins struct{ Dir string }

// Path is the path of binary name in b.
func (b Bins) Path(name string) string { return filepath.Join(b.Dir, name) }

// packages are built from the workspace at the repository's root: the four services, the
// operator CLI, and the NATS server at the version the workspace pins (go.work's build
// list, the version platform/testenv requires), so the broker the suite kills is the
// one the tests embed.
var packages = []string{
	"github.com/otpflow/otpflow/services/issuer/cmd/issuer",
	"github.com/otpflow/otpflow/services/dispatcher/cmd/dispatcher",
	"github.com/otpflow/otpflow/services/verifier/cmd/verifier",
	"github.com/otpflow/otpflow/services/auditor/cmd/auditor",
	"github.com/otpflow/otpflow/cmd/otpflow",
	"github.com/nats-io/nats-server/v2",
}

// Build compiles every binary the suite runs into a new temporary directory, with the
// go command on PATH (and the GOTOOLCHAIN the Makefile exports), from the workspace
// rooted at root. Symbol tables are left out: they only slow the link.
func Build(root string) (Bins, error) {
	dir, err := os.MkdirTemp("", "otpflow-chaos-bin-")
	if err != nil {
		return Bins{}, err
	}
	cmd := exec.Command("go", append([]string{"build", "-buildvcs=false", "-ldflags=-s -w", "-o", dir + string(os.PathSeparator)}, packages...)...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		_ = os.RemoveAll(dir)
		return Bins{}, fmt.Errorf("go build: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "nats-server")); err != nil {
		_ = os.RemoveAll(dir)
		return Bins{}, fmt.Errorf("nats-server binary: %w", err)
	}
	return Bins{Dir: dir}, nil
}
