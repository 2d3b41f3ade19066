package oci

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// FuzzTranslate feeds arbitrary config.json files (whose process, user,
// mounts and annotations come in part from a container image) through
// LoadSpec and Translate. Invariants: no panic; a refusal is one line;
// an accepted plan's VM size is within the runtime's bounds and its root
// an absolute path to a directory.
func FuzzTranslate(f *testing.F) {
	seed := func(edit func(*specs.Spec)) {
		s := &specs.Spec{
			Version: "1.0.2",
			Root:    &specs.Root{Path: "rootfs"},
			Process: &specs.Process{Args: []string{"/bin/sh"}, Cwd: "/", Env: []string{"PATH=/bin"}},
		}
		edit(s)
		b, err := json.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	seed(func(*specs.Spec) {})
	seed(func(s *specs.Spec) {
		s.Process.User = specs.User{UID: 1000, GID: 1000, AdditionalGids: []uint32{10}}
		s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 100, Hard: 200}}
		s.Process.Capabilities = &specs.LinuxCapabilities{Bounding: []string{"CAP_CHOWN"}}
		s.Process.ConsoleSize = &specs.Box{Height: 1 << 20, Width: 0}
	})
	seed(func(s *specs.Spec) {
		s.Mounts = []specs.Mount{
			{Destination: "/proc", Type: "proc"},
			{Destination: "/dev/shm", Type: "bind", Source: "/nonexistent", Options: []string{"rbind"}},
			{Destination: "/inner", Type: "bind", Source: "rootfs/srv", Options: []string{"bind", "ro"}},
			{Destination: "relative", Type: "tmpfs"},
		}
		s.Annotations = map[string]string{AnnotationRAMMiB: "8", AnnotationCPUs: "0", AnnotationTCPPorts: "70000:80"}
	})
	seed(func(s *specs.Spec) {
		s.Linux = &specs.Linux{
			Namespaces:  []specs.LinuxNamespace{{Type: "network", Path: "/proc/self/ns/net"}, {Type: "user"}},
			Resources:   &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptrOf(int64(-5))}, CPU: &specs.LinuxCPU{Cpus: "0-3,9999999999", Quota: ptrOf(int64(1 << 62)), Period: ptrOf(uint64(0))}},
			CgroupsPath: "../../escape",
			Devices:     []specs.LinuxDevice{{Path: "/dev/../etc", Type: "b", Major: -1}},
		}
	})
	f.Add([]byte(`{"ociVersion":"1.0.2","root":{"path":"/"},"process":{"args":[],"cwd":""}}`))
	f.Add([]byte(`{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["/bin/sh"],"cwd":"/"},"annotations":{"krun.ram_mib":"63","krun.cpus":"1"}}`))
	f.Add([]byte(`{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["/bin/sh"],"cwd":"/"},"annotations":{"krun.ram_mib":"64","krun.cpus":"0"}}`))
	f.Add([]byte(`{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["/bin/sh"],"cwd":"/"},"mounts":[{"destination":"/x","type":"bind"}]}`))
	f.Add([]byte(`{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["/bin/sh"],"cwd":"/"},"annotations":{"krun.ram_mib":"64","krun.cpus":"1"}}`))
	f.Add([]byte(`{"ociVersion":"1.2.0","root":{"path":"rootfs"},"process":{"args":["x"],"cwd":"/","user":{"uid":4294967295}},"hooks":{"prestart":[{"path":"relative"}]}}`))

	bundle := f.TempDir()
	if err := os.MkdirAll(filepath.Join(bundle, "rootfs", "srv"), 0o755); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, config []byte) {
		if err := os.WriteFile(filepath.Join(bundle, "config.json"), config, 0o644); err != nil {
			t.Fatal(err)
		}
		spec, err := LoadSpec(bundle)
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("LoadSpec's error is not one line: %q", err)
			}
			return
		}
		p, err := Translate("fuzz", bundle, spec, translateOptions{CgroupRoot: "/sys/fs/cgroup", OwnCgroup: "/"})
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("Translate's error is not one line: %q", err)
			}
			return
		}
		if p.MemoryMiB < MinMemoryMiB || p.CPUs < 1 {
			t.Fatalf("plan with %d MiB and %d CPUs", p.MemoryMiB, p.CPUs)
		}
		if st, err := os.Stat(p.Root); !filepath.IsAbs(p.Root) || err != nil || !st.IsDir() {
			t.Fatalf("root %q is not an absolute path to a directory (%v)", p.Root, err)
		}
	})
}
