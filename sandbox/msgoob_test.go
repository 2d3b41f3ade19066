package sandbox

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// A compromised plugin cannot use out-of-band data (MSG_OOB) on the unix
// sockets it holds. No plugin needs it (vhost-user, gRPC and passt are
// plain streams), and the AF_UNIX OOB code is kernel attack surface with
// a record of its own (CVE-2025-38236, a use-after-free reached from
// Chrome's renderer sandbox, which now refuses MSG_OOB): cutting the
// kernel attack surface is what docs/SECURITY.md says the seccomp layer
// is for. The plugin holds fd 5, a stream socket whose other end is the
// launcher's, as its vhost-user socket (fd 3 in a real plugin) is. On
// current code it sends the launcher an urgent byte, before and after
// Restrict.
func TestPluginCannotUseMSGOOB(t *testing.T) {
	for _, tc := range []struct{ name, arg string }{{"launch filter", ""}, {"after Restrict", "restrict"}} {
		t.Run(tc.name, func(t *testing.T) {
			pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			mine, theirs := os.NewFile(uintptr(pair[0]), "launcher-end"), os.NewFile(uintptr(pair[1]), "plugin-end")
			defer mine.Close()
			defer theirs.Close()
			p := startAttack(t, "blk", "x-oob", tc.arg, LaunchConfig{}, theirs)
			r, ok := p.result(t)
			if !ok {
				t.Fatalf("probe died: %s", p.stderr.String())
			}
			t.Logf("errnos: %v", r.Errnos)
			b := make([]byte, 1)
			n, _, _, _, err := unix.Recvmsg(int(mine.Fd()), b, nil, unix.MSG_OOB|unix.MSG_DONTWAIT)
			for _, k := range []string{"sendto_oob", "sendmsg_oob", "recvfrom_oob", "recvmsg_oob"} {
				if e := r.Errnos[k]; e != int(unix.EPERM) {
					t.Errorf("%s: errno %d (%v), want EPERM from the filter", k, e, unix.Errno(e))
				}
			}
			if err == nil && n == 1 {
				t.Errorf("the launcher's end of the plugin's socket received out-of-band byte %q", b[:n])
			}
		})
	}
}
