package oci

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHostFileNotOpenedBeforeItsTypeIsChecked: a file bind mount's source
// is copied into the guest by readHostFile, which opened the path for
// reading and only then checked that it was a regular file. Translate
// stats the resolved path first, but the path is opened again later: a
// source whose directory someone else can change (a volume another
// container writes, as a volume subpath names) can turn, between the
// two, into a FIFO, or through an intermediate symbolic link into a host
// device, and the open alone acts (it releases a FIFO's writer; a device
// driver's open runs: /dev/watchdog arms the host's watchdog, a tape
// rewinds). Here the FIFO's writer, blocked in open(2), was released by
// the runtime's open. Now the file is opened O_PATH, checked, and only a
// regular file is opened for reading (from review).
func TestHostFileNotOpenedBeforeItsTypeIsChecked(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "hosts")
	must(t, mkfifo(fifo))
	released := make(chan struct{})
	go func() {
		// A writer waits in open(2) until a reader opens the FIFO.
		if f, err := os.OpenFile(fifo, os.O_WRONLY, 0); err == nil {
			f.Close()
		}
		close(released)
	}()
	t.Cleanup(func() {
		// Release the writer if the runtime did not.
		if fd, err := unix.Open(fifo, unix.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
			<-released
			unix.Close(fd)
		}
	})
	time.Sleep(50 * time.Millisecond) // the writer in open(2)
	_, err := readHostFile(fifo, 1<<20)
	if err == nil {
		t.Fatal("a FIFO was read as a bind source")
	}
	select {
	case <-released:
		t.Fatalf("readHostFile opened the FIFO for reading before checking its type (the writer's open returned); error %v", err)
	case <-time.After(300 * time.Millisecond):
	}
}

// TestHostFileIntermediateLinkRefused: readHostFile is given the path
// Translate resolved (filepath.EvalSymlinks), which holds no symbolic
// link; one found there at the open is a component replaced since, and
// was followed (O_NOFOLLOW covers only the last component): a volume's
// directory swapped for a link to /etc made the runtime copy a host file
// of its choice into the guest. Now no link is followed (from review).
func TestHostFileIntermediateLinkRefused(t *testing.T) {
	secretDir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(secretDir, "hosts"), []byte("host secret\n"), 0o600))
	vol := t.TempDir()
	// The directory Translate resolved, swapped for a link afterwards.
	must(t, os.Symlink(secretDir, filepath.Join(vol, "sub")))
	b, err := readHostFile(filepath.Join(vol, "sub", "hosts"), 1<<20)
	if err == nil {
		t.Fatalf("read %q through a symbolic link in the resolved path", b)
	}
}

// TestPidFileTempNotFollowed: the pid file was written through a
// temporary file of a fixed name (FILE.tmp), created with O_TRUNC and
// following a symbolic link there: whoever can write the pid file's
// directory made the runtime, as root, overwrite any host file with the
// pid. runc creates its temporary file with O_EXCL. Now the temporary
// file is new, of a name of its own (from review).
func TestPidFileTempNotFollowed(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(t.TempDir(), "shadow")
	must(t, os.WriteFile(victim, []byte("root:$6$secret:19000::::::\n"), 0o600))
	pidFile := filepath.Join(dir, "pidfile")
	must(t, os.Symlink(victim, pidFile+".tmp"))
	if err := writePidFile(pidFile, 4242); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); !strings.HasPrefix(string(b), "root:") {
		t.Errorf("the file a planted FILE.tmp link names was overwritten: %q", b)
	}
	if b, err := os.ReadFile(pidFile); err != nil || string(b) != strconv.Itoa(4242) {
		t.Errorf("pid file: %q, %v", b, err)
	}
	if st, err := os.Lstat(pidFile); err != nil || !st.Mode().IsRegular() {
		t.Errorf("pid file is not a regular file: %v %v", st, err)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.Name() != "pidfile" && e.Name() != "pidfile.tmp" {
			t.Errorf("left behind: %s", e.Name())
		}
	}
}
