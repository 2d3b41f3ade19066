package fs

import (
	"os"
	"runtime"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/devices/fs/fuseclient"
)

// hostPerm returns the permission bits (07777) of a host path.
func hostPerm(t *testing.T, p string) uint32 {
	t.Helper()
	var st unix.Stat_t
	must(t, "host lstat "+p, unix.Lstat(p, &st))
	return st.Mode & 07777
}

// hostFile makes a host file with exactly mode (chmod after create, so
// that neither the umask nor the kernel's create rules interfere).
func hostFile(t *testing.T, p string, mode uint32) {
	t.Helper()
	must(t, "host create", os.WriteFile(p, []byte("host data\n"), 0o600))
	must(t, "host chmod", unix.Chmod(p, mode))
	if got := hostPerm(t, p); got != mode {
		t.Fatalf("host chmod %o gave %o", mode, got)
	}
}

func hostDir(t *testing.T, p string, mode uint32) {
	t.Helper()
	must(t, "host mkdir", os.Mkdir(p, 0o700))
	must(t, "host chmod", unix.Chmod(p, mode))
}

type setIDCase struct {
	name string
	// host prepares the share before INIT's client talks to it ("f" or
	// "d" in the share's root); nil: nothing.
	host func(t *testing.T, e *env)
	// op runs the guest side and returns the share-relative path to check
	// and, when the operation replies with attributes, their mode.
	op func(t *testing.T, e *env) (path string, reply uint32)
	// needs: "chown" (the process may give files away), "fsetid" (the
	// process holds CAP_FSETID, so only the server decides).
	needs string
	// Expected permission bits of the host file afterwards.
	nosuid, suidOn uint32
}

func fileWith(mode uint32) func(*testing.T, *env) {
	return func(t *testing.T, e *env) { hostFile(t, e.path("f"), mode) }
}

// openF looks up and opens the host file "f".
func openF(t *testing.T, e *env, flags uint32) (fuse.EntryOut, uint64) {
	t.Helper()
	en := e.lookup(fuse.RootID, "f")
	fh, err := e.c.Open(en.NodeID, flags)
	must(t, "OPEN f", err)
	return en, fh
}

func writeF(writeFlags uint32) func(*testing.T, *env) (string, uint32) {
	return func(t *testing.T, e *env) (string, uint32) {
		en, fh := openF(t, e, unix.O_WRONLY)
		n, err := e.c.WriteWith(en.NodeID, fh, 0, []byte("guest"), writeFlags)
		must(t, "WRITE", err)
		if n != 5 {
			t.Fatalf("WRITE wrote %d", n)
		}
		must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
		if b, _ := os.ReadFile(e.path("f")); string(b) != "guestdata\n" {
			t.Fatalf("host file reads %q after the write", b)
		}
		return "f", 0
	}
}

func setattrF(name string, in fuse.SetattrIn) func(*testing.T, *env) (string, uint32) {
	return func(t *testing.T, e *env) (string, uint32) {
		en := e.lookup(fuse.RootID, name)
		if in.Valid&fuse.FattrFh != 0 {
			fh, err := e.c.Open(en.NodeID, unix.O_WRONLY)
			must(t, "OPEN", err)
			in.Fh = fh
			defer e.c.Release(en.NodeID, fh, false)
		}
		a, err := e.c.Setattr(en.NodeID, in)
		must(t, "SETATTR", err)
		return name, a.Mode
	}
}

var setIDCases = []setIDCase{
	{
		name: "CREATE 04755",
		op: func(t *testing.T, e *env) (string, uint32) {
			en, _, err := e.c.Create(fuse.RootID, "n", unix.O_RDWR|unix.O_CREAT|unix.O_EXCL, 0o4755)
			must(t, "CREATE", err)
			return "n", en.Attr.Mode
		},
		nosuid: 0o755, suidOn: 0o4755,
	},
	{
		name: "CREATE 06755",
		op: func(t *testing.T, e *env) (string, uint32) {
			en, _, err := e.c.Create(fuse.RootID, "n", unix.O_WRONLY|unix.O_CREAT, 0o6755)
			must(t, "CREATE", err)
			return "n", en.Attr.Mode
		},
		nosuid: 0o755, suidOn: 0o6755,
	},
	{
		name: "MKNOD regular 06755",
		op: func(t *testing.T, e *env) (string, uint32) {
			en, err := e.c.Mknod(fuse.RootID, "n", unix.S_IFREG|0o6755, 0)
			must(t, "MKNOD", err)
			return "n", en.Attr.Mode
		},
		nosuid: 0o755, suidOn: 0o6755,
	},
	{
		name: "MKNOD fifo 02644",
		op: func(t *testing.T, e *env) (string, uint32) {
			en, err := e.c.Mknod(fuse.RootID, "n", unix.S_IFIFO|0o2644, 0)
			must(t, "MKNOD", err)
			return "n", en.Attr.Mode
		},
		nosuid: 0o644, suidOn: 0o2644,
	},
	{
		// mkdir(2) itself ignores set-id bits (a directory gets S_ISGID
		// only from a set-group-id parent or a chmod).
		name: "MKDIR 06755",
		op: func(t *testing.T, e *env) (string, uint32) {
			en, err := e.c.Mkdir(fuse.RootID, "n", 0o6755)
			must(t, "MKDIR", err)
			return "n", en.Attr.Mode
		},
		nosuid: 0o755, suidOn: 0o755,
	},
	{
		name:   "SETATTR file 06755",
		host:   fileWith(0o644),
		op:     setattrF("f", fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o6755}),
		nosuid: 0o755, suidOn: 0o6755,
	},
	{
		name:   "SETATTR file 04777 through a handle",
		host:   fileWith(0o755),
		op:     setattrF("f", fuse.SetattrIn{Valid: fuse.FattrMode | fuse.FattrFh, Mode: 0o4777}),
		nosuid: 0o777, suidOn: 0o4777,
	},
	{
		// The host's own suid file: a guest chmod keeps no set-id bit.
		name:   "SETATTR host suid file 04700",
		host:   fileWith(0o4755),
		op:     setattrF("f", fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o4700}),
		nosuid: 0o700, suidOn: 0o4700,
	},
	{
		name:   "SETATTR dir 02775 (sgid directory allowed)",
		host:   func(t *testing.T, e *env) { hostDir(t, e.path("d"), 0o755) },
		op:     setattrF("d", fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o2775}),
		nosuid: 0o2775, suidOn: 0o2775,
	},
	{
		name:   "SETATTR dir 06775",
		host:   func(t *testing.T, e *env) { hostDir(t, e.path("d"), 0o755) },
		op:     setattrF("d", fuse.SetattrIn{Valid: fuse.FattrMode, Mode: 0o6775}),
		nosuid: 0o2775, suidOn: 0o6775,
	},
	{
		name:   "WRITE to a 06755 file",
		host:   fileWith(0o6755),
		op:     writeF(0),
		needs:  "fsetid",
		nosuid: 0o755, suidOn: 0o6755,
	},
	{
		name:   "WRITE with FUSE_WRITE_KILL_SUIDGID to a 06755 file",
		host:   fileWith(0o6755),
		op:     writeF(fuse.WriteKillSuidgid),
		nosuid: 0o755, suidOn: 0o755,
	},
	{
		// S_ISGID without group execute grants nothing on exec; the
		// kernel keeps it on writes, and so does the server.
		name:   "WRITE to a 02745 file",
		host:   fileWith(0o2745),
		op:     writeF(fuse.WriteKillSuidgid),
		nosuid: 0o2745, suidOn: 0o2745,
	},
	{
		name: "READ of a 06755 file",
		host: fileWith(0o6755),
		op: func(t *testing.T, e *env) (string, uint32) {
			en, fh := openF(t, e, unix.O_RDONLY)
			b, err := e.c.Read(en.NodeID, fh, 0, 100)
			must(t, "READ", err)
			if string(b) != "host data\n" {
				t.Fatalf("READ %q", b)
			}
			must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
			a, err := e.c.Getattr(en.NodeID)
			must(t, "GETATTR", err)
			return "f", a.Mode
		},
		nosuid: 0o6755, suidOn: 0o6755,
	},
	{
		name: "OPEN O_TRUNC of a 04755 file",
		host: fileWith(0o4755),
		op: func(t *testing.T, e *env) (string, uint32) {
			en, fh := openF(t, e, unix.O_WRONLY|unix.O_TRUNC)
			must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
			return "f", 0
		},
		needs:  "fsetid",
		nosuid: 0o755, suidOn: 0o4755,
	},
	{
		name: "OPEN O_TRUNC with FUSE_OPEN_KILL_SUIDGID of a 06755 file",
		host: fileWith(0o6755),
		op: func(t *testing.T, e *env) (string, uint32) {
			en := e.lookup(fuse.RootID, "f")
			fh, err := e.c.OpenWith(en.NodeID, unix.O_WRONLY|unix.O_TRUNC, fuse.OpenKillSuidgid)
			must(t, "OPEN", err)
			must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
			return "f", 0
		},
		nosuid: 0o755, suidOn: 0o755,
	},
	{
		name: "CREATE O_TRUNC of an existing 04755 file",
		host: fileWith(0o4755),
		op: func(t *testing.T, e *env) (string, uint32) {
			_, _, err := e.c.Create(fuse.RootID, "f", unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC, 0o4755)
			must(t, "CREATE", err)
			return "f", 0
		},
		needs:  "fsetid",
		nosuid: 0o755, suidOn: 0o4755,
	},
	{
		name: "CREATE O_TRUNC with FUSE_OPEN_KILL_SUIDGID of an existing 04755 file",
		host: fileWith(0o4755),
		op: func(t *testing.T, e *env) (string, uint32) {
			_, _, err := e.c.CreateWith(fuse.RootID, "f", unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC, 0o644, fuse.OpenKillSuidgid)
			must(t, "CREATE", err)
			return "f", 0
		},
		nosuid: 0o755, suidOn: 0o755,
	},
	{
		name:   "truncate of a 04755 file",
		host:   fileWith(0o4755),
		op:     setattrF("f", fuse.SetattrIn{Valid: fuse.FattrSize, Size: 3}),
		needs:  "fsetid",
		nosuid: 0o755, suidOn: 0o4755,
	},
	{
		name:   "truncate with FATTR_KILL_SUIDGID of a 06755 file through a handle",
		host:   fileWith(0o6755),
		op:     setattrF("f", fuse.SetattrIn{Valid: fuse.FattrSize | fuse.FattrFh | fuse.FattrKillSuidgid, Size: 3}),
		nosuid: 0o755, suidOn: 0o755,
	},
	{
		name: "FALLOCATE on a 04755 file",
		host: fileWith(0o4755),
		op: func(t *testing.T, e *env) (string, uint32) {
			en, fh := openF(t, e, unix.O_WRONLY)
			must(t, "FALLOCATE", e.c.Fallocate(en.NodeID, fh, 0, 8192, 0))
			must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
			return "f", 0
		},
		needs:  "fsetid",
		nosuid: 0o755, suidOn: 0o4755,
	},
	{
		name:   "chown of a 06755 file",
		host:   fileWith(0o6755),
		op:     setattrF("f", fuse.SetattrIn{Valid: fuse.FattrUID | fuse.FattrGID, UID: 1234, GID: 1234}),
		needs:  "chown",
		nosuid: 0o755, suidOn: 0o755,
	},
	{
		// The server gives the new file to guest user 1000 with a chown,
		// which clears set-id bits; with suid=on it puts them back.
		name: "CREATE 04755 by guest user 1000",
		op: func(t *testing.T, e *env) (string, uint32) {
			e.c.UID, e.c.GID = 1000, 1000
			defer func() { e.c.UID, e.c.GID = 0, 0 }()
			en, _, err := e.c.Create(fuse.RootID, "n", unix.O_RDWR|unix.O_CREAT|unix.O_EXCL, 0o4755)
			must(t, "CREATE", err)
			if en.Attr.UID != 1000 {
				t.Fatalf("owner %d, want 1000", en.Attr.UID)
			}
			return "n", en.Attr.Mode
		},
		needs:  "chown",
		nosuid: 0o755, suidOn: 0o4755,
	},
	{
		name: "MKNOD 06755 by guest user 1000",
		op: func(t *testing.T, e *env) (string, uint32) {
			e.c.UID, e.c.GID = 1000, 1000
			defer func() { e.c.UID, e.c.GID = 0, 0 }()
			en, err := e.c.Mknod(fuse.RootID, "n", unix.S_IFREG|0o6755, 0)
			must(t, "MKNOD", err)
			return "n", en.Attr.Mode
		},
		needs:  "chown",
		nosuid: 0o755, suidOn: 0o6755,
	},
}

// runSetIDCase runs one case against a fresh share with suid=on or off and
// checks the host file's mode (and the reply's, when there is one).
func runSetIDCase(t *testing.T, tc setIDCase, suidOn bool) {
	e := newEnv(t, 7, func(c *ServerConfig) { c.AllowSetID = suidOn })
	switch tc.needs {
	case "chown":
		if !e.s.canChown {
			t.Skip("needs CAP_CHOWN (root) to give files away")
		}
	case "fsetid":
		if !e.s.canFsetid && suidOn {
			t.Skip("needs CAP_FSETID: without it the host kernel clears the bits on every write (TestSetIDWithoutCapFsetid)")
		}
	}
	if tc.host != nil {
		tc.host(t, e)
	}
	p, reply := tc.op(t, e)
	want := tc.nosuid
	if suidOn {
		want = tc.suidOn
	}
	if got := hostPerm(t, e.path(p)); got != want {
		t.Errorf("host %s has mode %04o, want %04o", p, got, want)
	}
	if reply != 0 && reply&07777 != hostPerm(t, e.path(p)) {
		t.Errorf("reply says mode %04o, host has %04o", reply&07777, hostPerm(t, e.path(p)))
	}
}

func TestSetIDNosuid(t *testing.T) {
	for _, tc := range setIDCases {
		t.Run(tc.name, func(t *testing.T) { runSetIDCase(t, tc, false) })
	}
}

func TestSetIDAllowed(t *testing.T) {
	for _, tc := range setIDCases {
		t.Run(tc.name, func(t *testing.T) { runSetIDCase(t, tc, true) })
	}
}

// dropFsetid removes CAP_FSETID from the calling thread's effective set
// and locks the goroutine to that thread for good: when the goroutine ends
// the runtime discards the thread, so no other goroutine runs without the
// capability.
func dropFsetid(t *testing.T) {
	runtime.LockOSThread()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	must(t, "capget", unix.Capget(&hdr, &data[0]))
	data[0].Effective &^= 1 << unix.CAP_FSETID
	must(t, "capset", unix.Capset(&hdr, &data[0]))
	if effectiveCaps()&(1<<unix.CAP_FSETID) != 0 {
		t.Fatal("CAP_FSETID still effective after capset")
	}
}

// TestSetIDWithoutCapFsetid is the sandboxed plugin's situation: the
// process holds no CAP_FSETID, the server leaves clearing on writes to the
// host kernel, and the kernel clears the bits on every write, truncate and
// fallocate, with or without suid=on. Modes are still filtered by the
// server.
func TestSetIDWithoutCapFsetid(t *testing.T) {
	for _, suidOn := range []bool{false, true} {
		for _, tc := range setIDCases {
			if tc.needs != "fsetid" {
				continue
			}
			name := tc.name
			if suidOn {
				name += " suid=on"
			}
			t.Run(name, func(t *testing.T) {
				dropFsetid(t)
				e := newEnv(t, 0, func(c *ServerConfig) { c.AllowSetID = suidOn })
				if e.s.canFsetid {
					t.Fatal("server thinks it holds CAP_FSETID")
				}
				tc.host(t, e)
				p, _ := tc.op(t, e)
				if got := hostPerm(t, e.path(p)); got != tc.nosuid {
					t.Errorf("host %s has mode %04o, want %04o", p, got, tc.nosuid)
				}
			})
		}
	}
	t.Run("CREATE 06755", func(t *testing.T) {
		dropFsetid(t)
		e := newEnv(t, 0, nil)
		_, _, err := e.c.Create(fuse.RootID, "n", unix.O_RDWR|unix.O_CREAT, 0o6755)
		must(t, "CREATE", err)
		if got := hostPerm(t, e.path("n")); got != 0o755 {
			t.Errorf("host mode %04o, want 0755", got)
		}
	})
}

// TestSetIDCapabilityXattr: file capabilities are refused like set-id bits
// unless suid=on.
func TestSetIDCapabilityXattr(t *testing.T) {
	// vfs_cap_data revision 2 granting CAP_NET_RAW (permitted).
	capData := make([]byte, 20)
	fuse.PutU32(capData, 0, 0x02000000)
	fuse.PutU32(capData, 4, 1<<unix.CAP_NET_RAW)
	for _, suidOn := range []bool{false, true} {
		e := newEnv(t, 0, func(c *ServerConfig) { c.AllowSetID = suidOn })
		hostFile(t, e.path("f"), 0o755)
		en := e.lookup(fuse.RootID, "f")
		err := e.c.Setxattr(en.NodeID, "security.capability", capData, 0)
		if !suidOn {
			wantErrno(t, "SETXATTR security.capability", err, syscall.EPERM)
			if _, err := unix.Lgetxattr(e.path("f"), "security.capability", make([]byte, 64)); err != unix.ENODATA {
				t.Fatalf("host file has security.capability (%v)", err)
			}
			// Other attributes are unaffected.
			must(t, "SETXATTR user.x", e.c.Setxattr(en.NodeID, "user.x", []byte("v"), 0))
			continue
		}
		if err == syscall.EOPNOTSUPP || err == syscall.EPERM {
			t.Logf("suid=on: the host refuses security.capability here (%v)", err)
			continue
		}
		must(t, "SETXATTR security.capability with suid=on", err)
	}
}

func TestSetIDInit(t *testing.T) {
	e := newEnv(t, 0, nil)
	out, err := e.c.Init(fuse.InitHandleKillprivV2 | fuse.InitHandleKillpriv)
	must(t, "INIT", err)
	if out.Flags != fuse.InitHandleKillprivV2 {
		t.Fatalf("INIT flags %#x, want only HANDLE_KILLPRIV_V2", out.Flags)
	}
}

// BenchmarkWrite4K is a 4 KiB WRITE through the server alone (in-process
// chain, no rings). Run as root it shows what clearing set-id bits costs a
// process holding CAP_FSETID: one fstat per WRITE on a nosuid share, none
// with suid=on (the sandboxed plugin holds no capabilities and pays
// nothing in either case).
func BenchmarkWrite4K(b *testing.B) {
	for _, suidOn := range []bool{false, true} {
		name := "nosuid"
		if suidOn {
			name = "suid=on"
		}
		b.Run(name, func(b *testing.B) {
			dir := b.TempDir()
			f, err := os.Open(dir)
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			s, err := NewServer(ServerConfig{Dir: f, AllowSetID: suidOn})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			c := fuseclient.New(&fuseclient.Local{Handle: func(c *fuseclient.MemChain) uint32 { return s.Handle(c) }})
			if _, err := c.Init(fuseclient.LinuxInitFlags); err != nil {
				b.Fatal(err)
			}
			en, fh, err := c.Create(fuse.RootID, "f", unix.O_RDWR|unix.O_CREAT, 0o644)
			if err != nil {
				b.Fatal(err)
			}
			data := make([]byte, 4096)
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := c.Write(en.NodeID, fh, uint64(i%256)*4096, data); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
