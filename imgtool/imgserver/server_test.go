package imgserver

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
	"github.com/krun-core/krun-core/sandbox"
)

// freeFD returns an fd number in the plugin's range that is not open in
// this process.
func freeFD(t *testing.T, not ...int) int {
	t.Helper()
	for fd := imagepb.FirstFD + imagepb.MaxFiles - 1; fd >= imagepb.FirstFD; fd-- {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			continue
		}
		taken := false
		for _, n := range not {
			taken = taken || n == fd
		}
		if !taken {
			return fd
		}
	}
	t.Skip("no free fd in the plugin's range in this test process")
	return -1
}

// placeAt opens path and moves it to fd number fd, as the launcher's
// ExtraFiles would.
func placeAt(t *testing.T, path string, fd int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Dup3(int(f.Fd()), fd, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
}

func TestServerOpenRestrictsFirst(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.qcow2")
	newQcow2(t, p, qcow2.CreateOptions{Size: 1 << 20}, nil)
	fd := freeFD(t)
	placeAt(t, p, fd)

	var got []sandbox.Policy
	s := NewServer(hclog.NewNullLogger(), func(pol sandbox.Policy, _ sandbox.Logger) error {
		got = append(got, pol)
		return nil
	})
	ctx := context.Background()
	if _, err := s.Info(ctx, &imagepb.InfoRequest{File: "image", Format: "qcow2"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Info before Open: %v", err)
	}
	if len(got) != 0 {
		t.Fatal("restricted before Open")
	}
	r, err := s.Open(ctx, &imagepb.OpenRequest{Files: map[string]uint32{"image": uint32(fd)}})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Syscalls != sandbox.ProfileBlock || len(got[0].ReadOnlyDirFDs)+len(got[0].ReadWriteDirFDs) != 0 {
		t.Fatalf("restrict calls %+v", got)
	}
	if !strings.Contains(r.GetSandbox(), "block") {
		t.Errorf("sandbox note %q", r.GetSandbox())
	}
	if err := got[0].Validate(); err != nil {
		t.Errorf("policy: %v", err)
	}
	in, err := s.Info(ctx, &imagepb.InfoRequest{File: "image", Format: "qcow2"})
	if err != nil || in.GetVirtualSize() != 1<<20 {
		t.Fatalf("Info: %+v, %v", in, err)
	}
	if _, err := s.Info(ctx, &imagepb.InfoRequest{File: "other", Format: "qcow2"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Info of an unknown file: %v", err)
	}
	if _, err := s.Open(ctx, &imagepb.OpenRequest{}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second Open: %v", err)
	}
}

func TestServerOpenRefusals(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a")
	os.WriteFile(p, []byte("x"), 0o644)
	fd := freeFD(t)
	placeAt(t, p, fd)
	closed := freeFD(t, fd)
	noRestrict := func(sandbox.Policy, sandbox.Logger) error { return nil }
	cases := []struct {
		name  string
		files map[string]uint32
		want  string
	}{
		{"stdio", map[string]uint32{"image": 2}, "outside"},
		{"too-high", map[string]uint32{"image": imagepb.FirstFD + imagepb.MaxFiles}, "outside"},
		{"not-inherited", map[string]uint32{"image": uint32(closed)}, "not inherited"},
		{"duplicate", map[string]uint32{"a": uint32(fd), "b": uint32(fd)}, "both claim"},
		{"empty-name", map[string]uint32{"": uint32(fd)}, "file name"},
	}
	for _, c := range cases {
		s := NewServer(nil, noRestrict)
		_, err := s.Open(context.Background(), &imagepb.OpenRequest{Files: c.files})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	// A sandbox that cannot be applied fails Open and every later call.
	s := NewServer(nil, func(sandbox.Policy, sandbox.Logger) error { return errors.New("sandbox: seccomp: no") })
	if _, err := s.Open(context.Background(), &imagepb.OpenRequest{Files: map[string]uint32{"image": uint32(fd)}}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Open with a failing sandbox: %v", err)
	}
	if _, err := s.Probe(context.Background(), &imagepb.ProbeRequest{File: "image"}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Probe after a failed Open: %v", err)
	}
	// No restrict function at all: refused unless the user turned the
	// sandbox off.
	s = NewServer(nil, nil)
	if _, err := s.Open(context.Background(), &imagepb.OpenRequest{}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Open without a sandbox: %v", err)
	}
	s = NewServer(nil, nil)
	if _, err := s.Open(context.Background(), &imagepb.OpenRequest{SandboxOff: true}); err != nil {
		t.Errorf("Open with the sandbox off: %v", err)
	}
}

func TestGuardTurnsPanicIntoError(t *testing.T) {
	s := NewServer(nil, nil)
	err := s.guard("Test", func() error { panic("boom") })
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("guard: %v", err)
	}
	// The user reads the error, one line: the stack is logged at
	// debug, not at warn or error (from review: ~50 lines on stderr).
	for _, tt := range []struct {
		level     hclog.Level
		wantStack bool
	}{{hclog.Warn, false}, {hclog.Debug, true}} {
		var buf bytes.Buffer
		s := NewServer(hclog.New(&hclog.LoggerOptions{Output: &buf, Level: tt.level}), nil)
		if err := s.guard("Test", func() error { panic("boom") }); status.Code(err) != codes.Internal {
			t.Fatalf("guard: %v", err)
		}
		if got := strings.Contains(buf.String(), "goroutine"); got != tt.wantStack {
			t.Fatalf("at %s the stack is logged: %v, want %v:\n%s", tt.level, got, tt.wantStack, buf.String())
		}
	}
	err = s.guard("Test", func() error { return ErrTooLarge })
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("guard(ErrTooLarge): %v", err)
	}
}
