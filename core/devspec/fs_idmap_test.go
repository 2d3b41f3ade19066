package devspec

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/sandbox"
)

// toHost is the fs server's guest-to-host translation (empty: identity).
func toHost(ms []devopts.IDMap, g uint32) (uint32, bool) {
	if len(ms) == 0 {
		return g, true
	}
	for _, m := range ms {
		if g >= m.Guest && g-m.Guest < m.Count {
			return m.Host + (g - m.Guest), true
		}
	}
	return 0, false
}

func TestComposeSwap(t *testing.T) {
	for _, c := range []struct {
		maps string
		swap sandbox.IDSwap
		want string
	}{
		{"", sandbox.IDSwap{Launcher: 0, Plugin: 65534}, "0:65534:1/1:1:65533/65534:0:1/65535:65535:4294901760"},
		{"0:1000:1", sandbox.IDSwap{Launcher: 0, Plugin: 65534}, "0:1000:1"},
		{"0:0:1", sandbox.IDSwap{Launcher: 0, Plugin: 65534}, "0:65534:1"},
		{"0:0:100000", sandbox.IDSwap{Launcher: 0, Plugin: 65534}, "0:65534:1/1:1:65533/65534:0:1/65535:65535:34465"},
		{"0:1000:1/1:100000:65536", sandbox.IDSwap{Launcher: 0, Plugin: 100005}, "0:1000:1/1:100000:5/6:0:1/7:100006:65530"},
		{"10:0:5", sandbox.IDSwap{Launcher: 0, Plugin: 4}, "10:4:1/11:1:3/14:0:1"},
		{"0:0:10", sandbox.IDSwap{Launcher: 3, Plugin: 3}, "0:0:10"},
		{"5:4294967294:1", sandbox.IDSwap{Launcher: 0, Plugin: 4294967294}, "5:0:1"},
	} {
		ms, err := devopts.ParseIDMaps(c.maps)
		if err != nil {
			t.Fatal(err)
		}
		got := ComposeSwap(ms, c.swap)
		if s := devopts.FormatIDMaps(got); s != c.want {
			t.Errorf("ComposeSwap(%q, %v) = %q, want %q", c.maps, c.swap, s, c.want)
		}
		// The plugin's parser accepts it, and every guest id maps to the
		// swap of what it mapped to.
		if _, err := devopts.ParseIDMaps(devopts.FormatIDMaps(got)); err != nil {
			t.Errorf("%q: composed maps refused: %v", c.maps, err)
		}
		rng := rand.New(rand.NewPCG(1, 2))
		probe := []uint32{0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 14, 15, 999, 1000, 65533, 65534, 65535, 100000, 4294967294}
		for i := 0; i < 1000; i++ {
			probe = append(probe, rng.Uint32N(200000), rng.Uint32())
		}
		for _, g := range probe {
			h, ok := toHost(ms, g)
			h2, ok2 := toHost(got, g)
			if ok != ok2 || (ok && h2 != c.swap.Swap(h)) {
				t.Errorf("%q, %v: guest %d -> %d,%v; composed -> %d,%v", c.maps, c.swap, g, h, ok, h2, ok2)
				break
			}
		}
	}
}

// As root, a share reaches the plugin as an ID-mapped mount (root's
// directory shows as the plugin's), kept until Close; where none can be
// made, as the plain directory with one warning.
func TestFSOpenIDMapped(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("ID-mapped mounts need root")
	}
	dir := filepath.Join(t.TempDir(), "share")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name    string
		spec    string
		lc      *sandbox.LaunchConfig
		uid     uint32 // the directory's owner through the handed-over fd
		uidmap  string
		warning bool
	}{
		{"no sandbox", "path=" + dir + ",tag=t", nil, 0, "", false},
		{"sandbox", "path=" + dir + ",tag=t", &sandbox.LaunchConfig{}, sandbox.DefaultPluginUID, "", false},
		{"chosen ids", "path=" + dir + ",tag=t,uidmap=0:0:1", &sandbox.LaunchConfig{HostUID: 4242, HostGID: 4343}, 4242, "0:0:1", false},
		{"no namespaces", "path=" + dir + ",tag=t,uidmap=0:0:1", &sandbox.LaunchConfig{Disable: []sandbox.Layer{sandbox.LayerNamespaces}},
			sandbox.DefaultPluginUID, "0:65534:1", false},
		{"devpts (no ID-mapped mounts)", "path=/dev/pts,tag=t", &sandbox.LaunchConfig{}, 0, "", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, err := ParseFS(c.spec)
			if err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			o, err := f.Open(OpenOptions{Sandbox: c.lc, Log: hclog.New(&hclog.LoggerOptions{Output: &logs})})
			if err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			if len(o.Files) != 1 || o.Files[0].Name != devopts.FileDir {
				t.Fatalf("files %+v", o.Files)
			}
			var st unix.Stat_t
			if err := unix.Fstat(int(o.Files[0].File.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Uid != c.uid {
				t.Errorf("handed-over directory: owner %d mode %o (%v), want a directory of %d", st.Uid, st.Mode, err, c.uid)
			}
			if o.Options[devopts.OptUIDMap] != c.uidmap {
				t.Errorf("uidmap option %q, want %q", o.Options[devopts.OptUIDMap], c.uidmap)
			}
			idmapped := c.lc != nil && !c.warning
			// Without an ID-mapped mount, a root krun-core still hands
			// over a detached copy of the share (sandbox.CloneShare).
			if want := idmapped || c.lc != nil && os.Geteuid() == 0; (len(o.kept) == 1) != want {
				t.Errorf("%d mounts kept, want a copy: %v", len(o.kept), want)
			}
			w := strings.Count(logs.String(), "no ID-mapped mount of a shared directory")
			if (w == 1) != c.warning || w > 1 {
				t.Errorf("log:\n%s", logs.String())
			}
			o.CloseFiles()
			if idmapped {
				// The kept copy still reaches the mount.
				if err := unix.Fstat(int(o.kept[0].Fd()), &st); err != nil || st.Uid != c.uid {
					t.Errorf("kept mount: owner %d (%v)", st.Uid, err)
				}
			}
		})
	}
}
