package sandbox

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

// The launcher's only answer: EPERM, the call not run, and never
// SECCOMP_USER_NOTIF_FLAG_CONTINUE.
func TestRefusalNeverContinues(t *testing.T) {
	for _, id := range []uint64{0, 1, 1 << 63} {
		r := refusal(id)
		if r.id != id || r.error != -int32(unix.EPERM) || r.val != 0 || r.flags != 0 {
			t.Errorf("refusal(%d) = %+v, want EPERM without flags", id, r)
		}
	}
}

// What arrives on the launcher's channel is checked: an fd that is not a
// seccomp listener is closed and reported, a failure message ends the wait,
// and so does a peer that goes away without a word.
func TestReceiveListenerChecksWhatArrives(t *testing.T) {
	pipeR, pipeW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pipeW.Close()
	for _, c := range []struct {
		name    string
		send    func(fd int) error
		wantLog string
	}{
		{"a pipe for a listener", func(fd int) error {
			return unix.Sendmsg(fd, []byte(chanListener), unix.UnixRights(int(pipeR.Fd())), nil, 0)
		}, "something other than a seccomp listener"},
		{"failure", func(fd int) error { return unix.Sendmsg(fd, []byte(chanFailed+"sandbox: root: no"), nil, nil, 0) },
			"the trampoline failed"},
		{"none", func(fd int) error { return unix.Sendmsg(fd, []byte(chanNone), nil, nil, 0) }, ""},
		{"peer gone", func(fd int) error { return unix.Close(fd) }, "no word from the trampoline"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
			if err != nil {
				t.Fatal(err)
			}
			mine := os.NewFile(uintptr(pair[0]), "mine")
			peerFD, err := unix.Dup(pair[1]) // the peer's end, as the trampoline holds it
			if err != nil {
				t.Fatal(err)
			}
			peer := os.NewFile(uintptr(pair[1]), "peer") // the launcher's copy
			logs := &syncbuf.Buffer{}
			log := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})
			done := make(chan struct{})
			go func() { receiveListener(mine, peer, "k", time.Second, log); close(done) }()
			if err := c.send(peerFD); err != nil {
				t.Fatal(err)
			}
			if c.name != "peer gone" {
				defer unix.Close(peerFD)
			}
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("receiveListener did not return")
			}
			if c.wantLog != "" && !strings.Contains(logs.String(), c.wantLog) {
				t.Errorf("log %q lacks %q", logs.String(), c.wantLog)
			}
		})
	}
}
