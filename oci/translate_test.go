package oci

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/krun-core/krun-core/guest/container"
)

func ptrOf[T any](v T) *T { return &v }

func baseSpec(t *testing.T) (*specs.Spec, string) {
	t.Helper()
	b := t.TempDir()
	os.MkdirAll(filepath.Join(b, "rootfs", "srv", "data"), 0o755)
	return &specs.Spec{
		Version: "1.0.2",
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{Args: []string{"/bin/sh"}, Cwd: "/", Env: []string{"PATH=/bin"}},
	}, b
}

// TestTranslate: what config.json becomes.
func TestTranslate(t *testing.T) {
	s, b := baseSpec(t)
	vol := t.TempDir()
	hostsFile := filepath.Join(t.TempDir(), "hosts")
	os.WriteFile(hostsFile, []byte("127.0.0.1 localhost\n"), 0o644)
	netns := "/proc/self/ns/net" // a namespace file, as /run/netns/NAME is
	s.Hostname = "box"
	s.Process.Terminal = true
	s.Process.ConsoleSize = &specs.Box{Height: 30, Width: 100}
	s.Process.User = specs.User{UID: 1000, GID: 1000, AdditionalGids: []uint32{10}, Umask: ptrOf(uint32(0o22))}
	s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 100, Hard: 200}}
	s.Process.Capabilities = &specs.LinuxCapabilities{Bounding: []string{"CAP_CHOWN"}, Effective: []string{"CAP_CHOWN"}}
	s.Process.NoNewPrivileges = true
	s.Process.OOMScoreAdj = ptrOf(100)
	s.Mounts = []specs.Mount{
		{Destination: "/proc", Type: "proc"},
		{Destination: "/dev/shm", Type: "bind", Source: t.TempDir(), Options: []string{"rbind"}},
		{Destination: "/data", Type: "bind", Source: vol, Options: []string{"rbind", "ro"}},
		{Destination: "/data2", Source: vol, Options: []string{"bind"}},
		{Destination: "/etc/hosts", Type: "bind", Source: hostsFile, Options: []string{"bind", "ro"}},
		{Destination: "/inner", Type: "bind", Source: filepath.Join(b, "rootfs", "srv", "data"), Options: []string{"bind"}},
	}
	s.Linux = &specs.Linux{
		Namespaces:  []specs.LinuxNamespace{{Type: "pid"}, {Type: "network", Path: netns}, {Type: "mount"}},
		Resources:   &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptrOf(int64(1 << 30))}, CPU: &specs.LinuxCPU{Quota: ptrOf(int64(150000)), Period: ptrOf(uint64(100000))}},
		CgroupsPath: "/machine/c1",
		Sysctl:      map[string]string{"net.ipv4.ip_forward": "1"},
		Devices:     []specs.LinuxDevice{{Path: "/dev/fuse", Type: "c", Major: 10, Minor: 229, FileMode: ptrOf(os.FileMode(0o666))}},
		MaskedPaths: []string{"/proc/kcore"}, ReadonlyPaths: []string{"/proc/sys"},
		Seccomp: &specs.LinuxSeccomp{DefaultAction: "SCMP_ACT_ERRNO"},
	}
	p, err := Translate("c1", b, s, translateOptions{CgroupRoot: "/sys/fs/cgroup"})
	if err != nil {
		t.Fatal(err)
	}
	if p.Root != filepath.Join(b, "rootfs") || p.Hostname != "box" || p.MemoryMiB != 1024 || p.CPUs != 2 {
		t.Errorf("root %s hostname %s memory %d cpus %d", p.Root, p.Hostname, p.MemoryMiB, p.CPUs)
	}
	if p.Cgroup.Path != "/sys/fs/cgroup/machine/c1" || p.Cgroup.CPUMax != "150000 100000" {
		t.Errorf("cgroup %+v", p.Cgroup)
	}
	if p.Net.Mode != NetNS || p.Net.Path != netns || !strings.Contains(strings.Join(p.Net.PasstArgs, " "), "--tcp-ports all") {
		t.Errorf("net %+v", p.Net)
	}
	if !p.Process.Terminal || p.Process.Rows != 30 || p.Process.Cols != 100 || p.Process.UID != 1000 || len(p.Process.Rlimits) != 1 {
		t.Errorf("process %+v", p.Process)
	}
	if e := p.Setup.Process; !e.NoNewPrivileges || *e.OOMScoreAdj != 100 || *e.Umask != 0o22 || e.Capabilities.Bounding[0] != "CAP_CHOWN" {
		t.Errorf("extras %+v", e)
	}
	if len(p.Shares) != 1 || p.Shares[0].Path != vol || p.Shares[0].ReadOnly {
		t.Errorf("shares %+v: one share of the volume, writable (one mount is rw)", p.Shares)
	}
	want := []struct{ dest, typ, src string }{
		{"/proc", "proc", ""}, {"/dev/shm", container.TypeTmpfs, ""}, {"/data", container.TypeVirtiofs, "krun-vol-0"},
		{"/data2", container.TypeVirtiofs, "krun-vol-0"}, {"/etc/hosts", container.TypeFile, "0"}, {"/inner", container.TypeBind, "/srv/data"},
	}
	if len(p.Setup.Mounts) != len(want) {
		t.Fatalf("mounts %+v", p.Setup.Mounts)
	}
	for i, w := range want {
		m := p.Setup.Mounts[i]
		if m.Destination != w.dest || m.Type != w.typ || m.Source != w.src {
			t.Errorf("mount %d: %+v, want %+v", i, m, w)
		}
	}
	if string(p.Setup.Files[0].Content) != "127.0.0.1 localhost\n" {
		t.Errorf("copied file %q", p.Setup.Files[0].Content)
	}
	if p.LookupOnHost != true {
		t.Error("/bin/sh is under no mount: it can be looked up on the host")
	}
}

// TestTranslateRefuses: what a VM cannot honour is one clear error.
func TestTranslateRefuses(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		edit       func(*specs.Spec)
	}{
		{"version", "ociVersion", func(s *specs.Spec) { s.Version = "invalid" }},
		{"version 2", "ociVersion", func(s *specs.Spec) { s.Version = "2.0.0" }},
		{"no process", "process", func(s *specs.Spec) { s.Process = nil }},
		{"relative cwd", "process.cwd", func(s *specs.Spec) { s.Process.Cwd = "tmp" }},
		// A name (the runtime-spec's field is Windows's; runc ignores
		// it and runs as uid 0) is refused, never taken for root.
		{"user name", "config.json: process.user.username", func(s *specs.Spec) { s.Process.User = specs.User{Username: "nobody"} }},
		{"user name with ids", "config.json: process.user.username", func(s *specs.Spec) { s.Process.User = specs.User{UID: 65534, GID: 65534, Username: "nobody"} }},
		{"unknown rlimit", "RLIMIT_TEST", func(s *specs.Spec) { s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_TEST"}} }},
		{"lowercase rlimit", "rlimit_nofile", func(s *specs.Spec) { s.Process.Rlimits = []specs.POSIXRlimit{{Type: "rlimit_nofile"}} }},
		{"unknown capability", "CAP_TEST", func(s *specs.Spec) {
			s.Process.Capabilities = &specs.LinuxCapabilities{Bounding: []string{"CAP_TEST"}}
		}},
		{"user namespace", "user namespaces", func(s *specs.Spec) {
			s.Linux = &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: "user"}}}
		}},
		{"uid mappings", "uidMappings", func(s *specs.Spec) {
			s.Linux = &specs.Linux{UIDMappings: []specs.LinuxIDMapping{{ContainerID: 0, HostID: 1000, Size: 1}}}
		}},
		{"mount namespace path", "joining the mount namespace", func(s *specs.Spec) {
			s.Linux = &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: "mount", Path: "/proc/1/ns/mnt"}}}
		}},
		{"host fs type", "mount type", func(s *specs.Spec) { s.Mounts = []specs.Mount{{Destination: "/x", Type: "ext4", Source: "/dev/sda1"}} }},
		{"bind of /proc", "kernel's own state", func(s *specs.Spec) {
			s.Mounts = []specs.Mount{{Destination: "/hostproc", Type: "bind", Source: "/proc", Options: []string{"rbind"}}}
		}},
		{"bind of a device", "character device", func(s *specs.Spec) {
			s.Mounts = []specs.Mount{{Destination: "/dev/x", Type: "bind", Source: "/dev/null", Options: []string{"bind"}}}
		}},
		{"missing bind source", "no such file", func(s *specs.Spec) {
			s.Mounts = []specs.Mount{{Destination: "/x", Type: "bind", Source: "/nonexistent/x", Options: []string{"bind"}}}
		}},
		{"small memory", "at least", func(s *specs.Spec) {
			s.Linux = &specs.Linux{Resources: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptrOf(int64(10 << 20))}}}
		}},
		{"bad cpus annotation", "krun.cpus", func(s *specs.Spec) { s.Annotations = map[string]string{"krun.cpus": "zero"} }},
		{"bad open files annotation", "krun.open_files", func(s *specs.Spec) { s.Annotations = map[string]string{"krun.open_files": "100"} }},
		{"createContainer hook", "createContainer", func(s *specs.Spec) {
			s.Hooks = &specs.Hooks{CreateContainer: []specs.Hook{{Path: "/bin/true"}}}
		}},
		{"scheduler", "scheduler", func(s *specs.Spec) { s.Process.Scheduler = &specs.Scheduler{Policy: "SCHED_OTHER"} }},
		{"preserve idmap", "ID-mapped", func(s *specs.Spec) {
			s.Mounts = []specs.Mount{{Destination: "/x", Type: "tmpfs", Options: []string{"idmap"}}}
		}},
		{"too many volumes", "room for", func(s *specs.Spec) {
			for i := 0; i < 8; i++ {
				s.Mounts = append(s.Mounts, specs.Mount{Destination: "/v" + string(rune('a'+i)), Type: "bind", Source: t.TempDir(), Options: []string{"bind"}})
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, b := baseSpec(t)
			tc.edit(s)
			_, err := Translate("x", b, s, translateOptions{})
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("got %v, want one line with %q", err, tc.want)
			}
		})
	}
}

func TestAnnotationsOverride(t *testing.T) {
	s, b := baseSpec(t)
	s.Linux = &specs.Linux{Resources: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptrOf(int64(1 << 30))}, CPU: &specs.LinuxCPU{Cpus: "0-3"}}}
	s.Annotations = map[string]string{AnnotationCPUs: "3", AnnotationRAMMiB: "768", AnnotationOpenFiles: "65536"}
	p, err := Translate("x", b, s, translateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.CPUs != 3 || p.MemoryMiB != 768 || p.OpenFiles != 65536 {
		t.Errorf("cpus %d memory %d open files %d, want the annotations' 3, 768 and 65536", p.CPUs, p.MemoryMiB, p.OpenFiles)
	}
	s.Annotations = nil
	if p, _ = Translate("x", b, s, translateOptions{}); p.CPUs != 4 || p.MemoryMiB != 1024 || p.OpenFiles != 0 {
		t.Errorf("cpus %d memory %d open files %d, want the cpuset's 4, the limit's 1024 and the default", p.CPUs, p.MemoryMiB, p.OpenFiles)
	}
}

func TestCgroupDir(t *testing.T) {
	for _, tc := range []struct {
		path    string
		systemd bool
		want    string
	}{
		{"/a/b", false, "/cg/a/b"},
		{"rel/c", false, "/cg/own/rel/c"},
		{"machine.slice:libpod:abc", true, "/cg/machine.slice/libpod-abc.scope"},
		{"system-foo.slice:crio:x", true, "/cg/system.slice/system-foo.slice/crio-x.scope"},
		{":docker:y", true, "/cg/system.slice/docker-y.scope"},
		{"kubepods-pod1.slice:cri-containerd:z", true, "/cg/kubepods.slice/kubepods-pod1.slice/cri-containerd-z.scope"},
	} {
		got, err := cgroupDir(tc.path, "id", translateOptions{SystemdCgroup: tc.systemd, CgroupRoot: "/cg", OwnCgroup: "/own"})
		if err != nil || got != tc.want {
			t.Errorf("cgroupDir(%q) = %q, %v; want %q", tc.path, got, err, tc.want)
		}
	}
	for _, bad := range []string{"/", "noslice:x", "a.slice:b"} {
		if _, err := cgroupDir(bad, "id", translateOptions{SystemdCgroup: bad != "/", CgroupRoot: "/cg", OwnCgroup: "/own"}); err == nil {
			t.Errorf("cgroupDir(%q) accepted", bad)
		}
	}
}

// TestPodContainers: what containerd's CRI plugin gives the containers of
// a pod. An application container joins the sandbox's ipc, uts and pid
// namespaces by path (kept as the VM's own) and its network namespace
// (passt there); the sandbox container itself gets no network.
func TestPodContainers(t *testing.T) {
	s, b := baseSpec(t)
	netns := "/proc/self/ns/net"
	s.Linux = &specs.Linux{Namespaces: []specs.LinuxNamespace{
		{Type: "pid", Path: "/proc/1/ns/pid"}, {Type: "ipc", Path: "/proc/1/ns/ipc"},
		{Type: "uts", Path: "/proc/1/ns/uts"}, {Type: "mount"}, {Type: "network", Path: netns},
	}}
	for _, tc := range []struct {
		annotations map[string]string
		want        string
	}{
		{map[string]string{"io.kubernetes.cri.container-type": "container"}, NetNS},
		{map[string]string{"io.kubernetes.cri.container-type": "sandbox"}, NetNone},
		{map[string]string{"io.kubernetes.cri-o.ContainerType": "sandbox"}, NetNone},
	} {
		s.Annotations = tc.annotations
		p, err := Translate("x", b, s, translateOptions{})
		if err != nil {
			t.Fatalf("%v: %v", tc.annotations, err)
		}
		if p.Net.Mode != tc.want {
			t.Errorf("%v: network %q, want %q", tc.annotations, p.Net.Mode, tc.want)
		}
	}
}

// TestPortAnnotations: krun.tcp_ports and krun.udp_ports choose what passt
// forwards from a network namespace; every port by default.
func TestPortAnnotations(t *testing.T) {
	s, b := baseSpec(t)
	netns := "/proc/self/ns/net"
	s.Linux = &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: "network", Path: netns}}}
	for _, tc := range []struct {
		tcp, udp string // "" leaves the annotation out
		want     string // passt's arguments, or the error's words
	}{
		{"", "", "--tcp-ports all --udp-ports all"},
		{"8080", "none", "--tcp-ports 8080 --udp-ports none"},
		{"80,443,8000-8100", "", "--tcp-ports 80,443,8000-8100 --udp-ports all"},
		{"80;rm", "", "krun.tcp_ports"},
		{"", "0", "krun.udp_ports"},
		{"", "90-80", "krun.udp_ports"},
		{"70000", "", "krun.tcp_ports"},
		{"", "", "--tcp-ports all --udp-ports all"},
	} {
		s.Annotations = map[string]string{}
		if tc.tcp != "" {
			s.Annotations[AnnotationTCPPorts] = tc.tcp
		}
		if tc.udp != "" {
			s.Annotations[AnnotationUDPPorts] = tc.udp
		}
		p, err := Translate("x", b, s, translateOptions{})
		switch {
		case err != nil:
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%q/%q: %v, want an error naming %s", tc.tcp, tc.udp, err, tc.want)
			}
		case strings.Join(p.Net.PasstArgs, " ") != tc.want:
			t.Errorf("%q/%q: passt %q, want %q", tc.tcp, tc.udp, p.Net.PasstArgs, tc.want)
		}
	}
}

// TestProcessFileNamesItsFields: a field that exec --process refuses is
// named as it is in that file, which is the process object itself: it was
// named "config.json: process.user.username", as though the bundle's
// config were at fault.
func TestProcessFileNamesItsFields(t *testing.T) {
	for _, tc := range []struct{ json, want string }{
		{`{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0,"username":"nobody"}}`, "user.username"},
		{`{"args":["id"],"cwd":"tmp"}`, "cwd"},
		{`{"args":["id"],"cwd":"/","rlimits":[{"type":"RLIMIT_TEST"}]}`, "rlimits"},
		{`{"args":["id"],"cwd":"/","scheduler":{"policy":"SCHED_OTHER"}}`, "scheduler"},
		{`{"args":[],"cwd":"/"}`, "args"},
	} {
		path := filepath.Join(t.TempDir(), "process.json")
		if err := os.WriteFile(path, []byte(tc.json), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := loadProcess(path)
		want := "--process " + path + ": " + tc.want + ": "
		if err == nil || !strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), "config.json") || strings.Contains(err.Error(), "\n") {
			t.Errorf("--process %s: %v; want one line starting %q", tc.json, err, want)
		}
	}
}
