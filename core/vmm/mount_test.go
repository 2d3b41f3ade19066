package vmm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/guest/container"
)

// TestShareMountPoint: with a root, --fs mount=GUESTDIR is where krun-init
// mounts the share (default /mnt/TAG); two shares on one mount point, a
// mount point with a container, or one without a root at all are refused
// before anything starts.
func TestShareMountPoint(t *testing.T) {
	share := func(t *testing.T, spec string) *devspec.FSSpec {
		t.Helper()
		s, err := devspec.ParseFS("path=" + t.TempDir() + "," + spec)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	c := prepTestExecWith(t, nil, func(c *Context) {
		for _, s := range []*devspec.FSSpec{share(t, "tag=data,mount=/srv/data,readonly=on"), share(t, "tag=plain")} {
			if err := c.AddDevice(s); err != nil {
				t.Fatal(err)
			}
		}
	})
	got := map[string]string{}
	for _, m := range c.exec.cfg.Mounts {
		got[m.Source] = m.Target
		if m.Source == "data" && !m.ReadOnly {
			t.Error("readonly=on lost")
		}
	}
	if got["data"] != "/srv/data" || got["plain"] != "/mnt/plain" {
		t.Errorf("mount points %v, want data at /srv/data and plain at /mnt/plain", got)
	}

	// A share inside another's mount point is mounted after it, whatever
	// the order given (from review).
	c = prepTestExecWith(t, nil, func(c *Context) {
		for _, spec := range []string{"tag=in,mount=/data/sub", "tag=b", "tag=out,mount=/data", "tag=all,mount=/mnt"} {
			c.AddDevice(share(t, spec))
		}
	})
	var order []string
	for _, m := range c.exec.cfg.Mounts {
		order = append(order, m.Target)
	}
	if strings.Join(order, " ") != "/data /mnt /data/sub /mnt/b" {
		t.Errorf("mount order %v, want outer mount points first", order)
	}

	tests := []struct {
		name  string
		setup func(t *testing.T, c *Context)
		want  string
	}{
		{"a tag that climbs to /proc", func(t *testing.T, c *Context) {
			c.AddDevice(share(t, "tag=../proc"))
		}, "krun-init's own"},
		{"read-only root without the mount point", func(t *testing.T, c *Context) {
			c.SetRoot(c.exec.root, true)
			c.AddDevice(share(t, "tag=a,mount=/data"))
		}, "not a directory in the read-only root"},
		{"read-only root with the mount point through a symlink", func(t *testing.T, c *Context) {
			os.Symlink("/bin", filepath.Join(c.exec.root, "link"))
			c.SetRoot(c.exec.root, true)
			c.AddDevice(share(t, "tag=a,mount=/link"))
		}, "not a directory in the read-only root"},
		{"same mount point twice", func(t *testing.T, c *Context) {
			c.AddDevice(share(t, "tag=a,mount=/data"))
			c.AddDevice(share(t, "tag=b,mount=/data/"))
		}, "used twice"},
		{"with a container", func(t *testing.T, c *Context) {
			if err := c.SetContainer(&container.Setup{}); err != nil {
				t.Fatal(err)
			}
			c.AddDevice(share(t, "tag=a,mount=/data"))
		}, "mount= with a container"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := prepTestExecErr(t, nil, func(c *Context) { tt.setup(t, c) })
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("prepareExec: %v, want %q", err, tt.want)
			}
		})
	}

	// A read-only root takes a share where it has the directory, or in
	// krun-init's own tmpfs mounts.
	c = prepTestExecWith(t, nil, func(c *Context) {
		c.SetRoot(c.exec.root, true)
		// /bin/inner lies in share a, not in the root: not looked for there.
		for _, spec := range []string{"tag=a,mount=/bin", "tag=b,mount=/tmp/x/y", "tag=c,mount=/run/z", "tag=d,mount=/bin/inner"} {
			c.AddDevice(share(t, spec))
		}
	})
	if n := len(c.exec.cfg.Mounts); n != 4 {
		t.Errorf("%d mounts, want 4", n)
	}

	// Without a root nothing mounts it.
	c = NewContext(nil)
	if err := c.AddDevice(share(t, "tag=a,mount=/data")); err != nil {
		t.Fatal(err)
	}
	if err := c.checkNoMounts(); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "needs a root") {
		t.Fatalf("mount= without a root: %v", err)
	}
	if _, err := c.Start(t.Context()); !errors.Is(err, ErrConfig) {
		t.Fatalf("Start with mount= and no root: %v", err)
	}
}
