package vmm

import (
	"os"
	"testing"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
	"github.com/krun-core/krun-core/internal/ptytest"
)

// TestExecFilesHandedOverOneWay: krun-oci exec's stdout and stderr are
// often the caller's terminal, one O_RDWR description with its stdin;
// passed as they were, the console plugin could read what the user types
// to the shell's foreground job through them. Exec opens them again write
// only, as the main console's (devspec's handOver).
func TestExecFilesHandedOverOneWay(t *testing.T) {
	c := prepTestExec(t, hclog.NewNullLogger())
	defer c.exec.close()
	_, tty := ptytest.Open(t)
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdinR.Close()
	defer stdinW.Close()
	statusR, statusW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer statusR.Close()
	defer statusW.Close()
	p := &container.Process{Args: []string{"/bin/true"}, Cwd: "/"}
	if _, err := c.Exec(p, stdinR, tty, tty, statusW); err != nil {
		t.Fatal(err)
	}
	// The plugin's end of the control channel.
	buf, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4*4))
	_, oobn, _, _, err := unix.Recvmsg(int(c.exec.controlR.Fd()), buf, oob, 0)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages: %v, %v", msgs, err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 4 {
		t.Fatalf("files: %v, %v", fds, err)
	}
	for _, fd := range fds {
		defer unix.Close(fd)
	}
	for i, want := range []int{unix.O_RDONLY, unix.O_WRONLY, unix.O_WRONLY, unix.O_WRONLY} {
		fl, err := unix.FcntlInt(uintptr(fds[i]), unix.F_GETFL, 0)
		if err != nil {
			t.Fatal(err)
		}
		if fl&unix.O_ACCMODE != want {
			t.Errorf("exec file %d has access mode %#o, want %#o", i, fl&unix.O_ACCMODE, want)
		}
	}
}
