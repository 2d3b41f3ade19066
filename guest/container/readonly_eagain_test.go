package container

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const readOnlyEAGAINNS = "KRUN_CONTAINER_TEST_RO_EAGAIN"

// init runs the child half of TestReadOnlyKeepsNosuidOnEAGAIN in
// its own mount namespace (before TestMain).
func init() {
	if dir := os.Getenv(readOnlyEAGAINNS); dir != "" {
		opts, err := readOnlyEAGAINChild(dir)
		if err != nil {
			fmt.Println("FAIL:", err)
			os.Exit(1)
		}
		fmt.Println("OPTIONS:" + opts)
		os.Exit(0)
	}
}

func readOnlyEAGAINChild(dir string) (string, error) {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return "", err
	}
	sub := filepath.Join(dir, "vol")
	if err := os.Mkdir(sub, 0o755); err != nil {
		return "", err
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=64k"); err != nil {
		return "", err
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	// The second walk of readOnly (the one that reads the mount's
	// flags back) meets an EAGAIN storm that outlasts the retries; the
	// walks before and after it succeed.
	calls := 0
	r := &rootDir{fd: fd, path: dir, logf: func(string, ...any) {}, openat2: func(d int, p string, how *unix.OpenHow) (int, error) {
		calls++
		if calls >= 2 && calls <= 2+maxResolveRetries {
			return -1, unix.EAGAIN
		}
		return unix.Openat2(d, p, how)
	}}
	err = r.readOnly("/vol")
	m, merr := mountInfo()
	if merr != nil {
		return "", merr
	}
	return fmt.Sprintf("%s err=%v", m[sub], err), nil
}

// TestReadOnlyKeepsNosuidOnEAGAIN: readOnly (OCI readonlyPaths)
// bind-remounts a path read-only and keeps its nosuid, nodev and noexec,
// which it reads back through a second walk of the path; when that walk
// fails the remount is made with MS_RDONLY alone, which clears them. The
// walk could not fail with EAGAIN before c41ced7 (retried without bound);
// now a storm of more than maxResolveRetries does, and the path ends up
// read-only but suid, dev and exec (fail-open), where the error should
// have stopped the setup.
func TestReadOnlyKeepsNosuidOnEAGAIN(t *testing.T) {
	out, err := inMountNamespace(t, readOnlyEAGAINNS)
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	s := string(out)
	i := strings.Index(s, "OPTIONS:")
	if i < 0 {
		t.Fatalf("child said nothing:\n%s", s)
	}
	line := strings.TrimSpace(s[i+len("OPTIONS:"):])
	if strings.Contains(line, "err=<nil>") {
		for _, f := range []string{"nosuid", "nodev", "noexec"} {
			if !strings.Contains(line, f) {
				t.Errorf("readOnly succeeded and the mount lost %s: %s", f, line)
			}
		}
	}
}
