package container

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

const inMountNS = "KRUN_CONTAINER_TEST_MOUNTNS"

func TestMain(m *testing.M) {
	if dir := os.Getenv(inMountNS); dir != "" {
		if err := applyInNamespace(dir); err != nil {
			fmt.Println("FAIL:", err)
			os.Exit(1)
		}
		fmt.Println("OK")
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// testSetup exercises every mount type Apply makes without a VM (no
// virtio-fs) and the paths, devices and links.
func testSetup() *Setup {
	return &Setup{
		Mounts: []Mount{
			{Destination: "/proc", Type: TypeProc, Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: TypeTmpfs, Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: TypeDevpts, Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/etc/hostname", Type: TypeFile, Source: "0", Options: []string{"ro"}},
			{Destination: "/data", Type: TypeBind, Source: "/srv/data", Options: []string{"ro", "nosuid"}},
			{Destination: "/link/sub", Type: TypeTmpfs}, // /link is a symlink to /real inside the root
			{Destination: "/copy", Type: TypeTmpfs, Options: []string{"tmpcopyup"}},
		},
		Files:          []File{{Content: []byte("box\n"), Mode: 0o644}},
		DefaultDevices: true,
		Devices:        []Device{{Path: "/dev/mine", Type: "c", Major: 1, Minor: 3, Mode: 0o600, UID: 7, GID: 8}},
		MaskedPaths:    []string{"/proc/version", "/proc/acpi", "/missing"},
		ReadonlyPaths:  []string{"/proc/sys"},
	}
}

// applyInNamespace runs in a child in a mount namespace of its own.
func applyInNamespace(dir string) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return err
	}
	root := filepath.Join(dir, "root")
	for _, d := range []string{"srv/data", "real", "copy", "etc"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	os.Symlink("/real", filepath.Join(root, "link"))
	os.WriteFile(filepath.Join(root, "copy", "kept"), []byte("under"), 0o640)
	os.WriteFile(filepath.Join(root, "srv/data/f"), []byte("data"), 0o644)
	s := testSetup()
	if err := s.Validate(); err != nil {
		return err
	}
	if err := Apply(root, s, ApplyOptions{WorkDir: filepath.Join(dir, "work")}); err != nil {
		return err
	}
	mounts, err := mountInfo()
	if err != nil {
		return err
	}
	want := map[string]string{ // mount point -> fs type and an option that must be there
		root + "/proc": "proc nosuid", root + "/dev": "tmpfs nosuid", root + "/dev/pts": "devpts noexec",
		root + "/etc/hostname": "ro", root + "/data": "ro", root + "/real/sub": "tmpfs",
		root + "/copy": "tmpfs", root + "/proc/sys": "ro", root + "/proc/acpi": "tmpfs ro",
	}
	for mp, w := range want {
		got, ok := mounts[mp]
		if !ok {
			return fmt.Errorf("no mount on %s", mp)
		}
		for _, word := range strings.Fields(w) {
			if !strings.Contains(got, word) {
				return fmt.Errorf("mount on %s is %q, want %q", mp, got, w)
			}
		}
	}
	if b, _ := os.ReadFile(root + "/etc/hostname"); string(b) != "box\n" {
		return fmt.Errorf("/etc/hostname reads %q", b)
	}
	if err := os.WriteFile(root+"/etc/hostname", []byte("x"), 0); err == nil {
		return fmt.Errorf("/etc/hostname is writable")
	}
	if b, _ := os.ReadFile(root + "/data/f"); string(b) != "data" {
		return fmt.Errorf("/data/f reads %q", b)
	}
	if b, _ := os.ReadFile(root + "/copy/kept"); string(b) != "under" {
		return fmt.Errorf("tmpcopyup lost /copy/kept: %q", b)
	}
	if b, err := os.ReadFile(root + "/proc/version"); err != nil || len(b) != 0 {
		return fmt.Errorf("/proc/version is not masked: %d bytes, %v", len(b), err)
	}
	var st unix.Stat_t
	if err := unix.Stat(root+"/dev/mine", &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != unix.Mkdev(1, 3) ||
		st.Mode&0o777 != 0o600 || st.Uid != 7 || st.Gid != 8 {
		return fmt.Errorf("/dev/mine: %+v %v", st, err)
	}
	if err := unix.Stat(root+"/dev/null", &st); err != nil || st.Rdev != unix.Mkdev(1, 3) {
		return fmt.Errorf("/dev/null: %v", err)
	}
	if l, _ := os.Readlink(root + "/dev/ptmx"); l != "pts/ptmx" {
		return fmt.Errorf("/dev/ptmx links to %q", l)
	}
	if l, _ := os.Readlink(root + "/dev/fd"); l != "/proc/self/fd" {
		return fmt.Errorf("/dev/fd links to %q", l)
	}
	return nil
}

// mountInfo maps mount points to "fstype options".
func mountInfo() (map[string]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, fl := range fields {
			if fl == "-" && i+1 < len(fields) && len(fields) > 5 {
				out[fields[4]] = fields[i+1] + " " + fields[5] + "," + strings.Join(fields[i+2:], " ")
			}
		}
	}
	return out, sc.Err()
}

// TestApply builds a container environment in a directory, in a child
// process with a mount namespace of its own, and checks the result from
// inside it.
func TestApply(t *testing.T) {
	out, err := inMountNamespace(t, inMountNS)
	if err != nil || !strings.Contains(string(out), "OK") {
		t.Fatalf("apply in a mount namespace: %v\n%s", err, out)
	}
}

// inMountNamespace runs the test binary again in a mount namespace of its
// own, with env set to a new temporary directory (the child's half of the
// test runs from TestMain or init on that variable), and returns its
// output. It skips the test when not root.
func inMountNamespace(t *testing.T, env string) ([]byte, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts in a mount namespace of the test's own)")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), env+"="+t.TempDir())
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	return cmd.CombinedOutput()
}

func TestValidateRejects(t *testing.T) {
	for name, s := range map[string]*Setup{
		"relative destination": {Mounts: []Mount{{Destination: "proc", Type: TypeProc}}},
		"host fs type":         {Mounts: []Mount{{Destination: "/x", Type: "ext4"}}},
		"file index":           {Mounts: []Mount{{Destination: "/x", Type: TypeFile, Source: "0"}}},
		"unmounted file":       {Files: []File{{Content: []byte("x")}}},
		"idmap option":         {Mounts: []Mount{{Destination: "/x", Type: TypeTmpfs, Options: []string{"idmap"}}}},
		"comma in option":      {Mounts: []Mount{{Destination: "/x", Type: TypeTmpfs, Options: []string{"size=1m,exec"}}}},
		"device outside /dev":  {Devices: []Device{{Path: "/etc/x", Type: "c"}}},
		"device type":          {Devices: []Device{{Path: "/dev/x", Type: "z"}}},
		"sysctl dotdot":        {Sysctl: map[string]string{"..kernel": "1"}},
		"unknown capability":   {Process: Extras{Capabilities: &Capabilities{Bounding: []string{"CAP_TEST"}}}},
		"oom score":            {Process: Extras{OOMScoreAdj: ptr(1001)}},
		"propagation":          {RootPropagation: "sideways"},
		"virtiofs tag":         {Mounts: []Mount{{Destination: "/x", Type: TypeVirtiofs}}},
	} {
		if err := s.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if err := testSetup().Validate(); err != nil {
		t.Errorf("a good setup: %v", err)
	}
}

// TestProcessValidateRejectsNoID: an exec request's uid or gid
// 4294967295 is (uid_t)-1, "unchanged" to setresuid and setresgid: the
// program would run with root's ids instead of failing.
func TestProcessValidateRejectsNoID(t *testing.T) {
	for name, p := range map[string]Process{
		"uid":   {Args: []string{"id"}, Cwd: "/", UID: 1<<32 - 1},
		"gid":   {Args: []string{"id"}, Cwd: "/", UID: 1000, GID: 1<<32 - 1},
		"group": {Args: []string{"id"}, Cwd: "/", UID: 1000, AdditionalGIDs: []uint32{1<<32 - 1}},
	} {
		if err := p.Validate(); err == nil || !strings.Contains(err.Error(), "4294967295") {
			t.Errorf("%s: Validate = %v, want a refusal of id 4294967295", name, err)
		}
	}
	good := Process{Args: []string{"id"}, Cwd: "/", UID: 1<<32 - 2, GID: 1<<32 - 2}
	if err := good.Validate(); err != nil {
		t.Errorf("uid and gid 4294967294: %v", err)
	}
}

func ptr[T any](v T) *T { return &v }

func TestParseOptions(t *testing.T) {
	o, err := ParseOptions([]string{"ro", "nosuid", "rw", "rbind", "rslave", "size=1m", "mode=755", "tmpcopyup"})
	if err != nil {
		t.Fatal(err)
	}
	if o.Flags != msNosuid || o.Clear&msRdonly == 0 || !o.Bind || !o.Recursive || o.Propagation != msSlave|msRec ||
		o.Data != "size=1m,mode=755" || !o.TmpCopyUp {
		t.Errorf("parsed %+v", o)
	}
	if unix.MS_NOSUID != msNosuid || unix.MS_REC != msRec || unix.MS_SLAVE != msSlave || unix.MS_STRICTATIME != msStrictatime {
		t.Error("flag constants differ from the kernel's")
	}
}

// TestRootOpenBoundsEAGAIN: a walk that RESOLVE_IN_ROOT keeps answering
// EAGAIN (a rename storm elsewhere racing an image's long ".." chain)
// fails after maxResolveRetries retries with EAGAIN, instead of spinning
// for as long as the storm lasts; a walk that meets EAGAIN a few times
// succeeds, and EINTR is retried.
func TestRootOpenBoundsEAGAIN(t *testing.T) {
	for _, tc := range []struct {
		name     string
		answers  []error // then nil: success
		wantErr  error
		wantCall int
	}{
		{"storm", slices.Repeat([]error{unix.EAGAIN}, 1000), unix.EAGAIN, maxResolveRetries + 1},
		{"a few", []error{unix.EAGAIN, unix.EINTR, unix.EAGAIN}, nil, 4},
		{"signals", slices.Repeat([]error{unix.EINTR}, 500), nil, 501},
		{"missing", []error{unix.ENOENT}, unix.ENOENT, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			r := &rootDir{fd: -1, openat2: func(int, string, *unix.OpenHow) (int, error) {
				calls++
				if calls <= len(tc.answers) {
					return -1, tc.answers[calls-1]
				}
				return 42, nil
			}}
			fd, err := r.open("/a/vol", unix.O_PATH)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) || calls != tc.wantCall {
				t.Fatalf("open: fd %d, %v after %d calls; want %v after %d", fd, err, calls, tc.wantErr, tc.wantCall)
			}
			if tc.wantErr == nil && fd != 42 {
				t.Fatalf("open: fd %d, want 42", fd)
			}
		})
	}
}
