package vmtest

import (
	"fmt"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/kvm"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// DirectKVM says whether a test boots its krun-core guest on this host's
// KVM directly, or nested inside a QEMU TCG guest with emulated AMD-V. It
// asks kvm.CheckHost, the function krun-core run itself uses, so a host
// whose /dev/kvm cannot boot a stock kernel (kvm_pvm, for one) takes the
// nested path; the reason is logged.
func DirectKVM(t testing.TB) bool {
	t.Helper()
	if err := kvm.CheckHost(); err != nil {
		t.Logf("nested KVM under QEMU TCG: %v", err)
		return false
	}
	return true
}

// DefaultDirectTimeout bounds a krun-core run started on the host's KVM by
// RunDirect.
const DefaultDirectTimeout = 5 * time.Minute

// RunDirect runs cmd (not yet started; typically krun-core run on the
// host's KVM) with a time limit of its own and returns its combined
// output. Past timeout (0: DefaultDirectTimeout) the process is killed and
// the error says so, with the last lines of its output.
func RunDirect(t testing.TB, timeout time.Duration, cmd *exec.Cmd) ([]byte, error) {
	t.Helper()
	if timeout <= 0 {
		timeout = DefaultDirectTimeout
	}
	var out syncbuf.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	var expired atomic.Bool
	timer := time.AfterFunc(timeout, func() {
		expired.Store(true)
		cmd.Process.Kill()
	})
	err := cmd.Wait()
	timer.Stop()
	b := []byte(out.String())
	if expired.Load() {
		return b, fmt.Errorf("%s did not end within %v (killed); last output:\n%s", cmd.Path, timeout, Tail(string(b), 30))
	}
	return b, err
}

// Tail returns the last n lines of s.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
