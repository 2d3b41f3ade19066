package sandbox

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	good := Policy{Kind: "example-null", Syscalls: ProfileMinimal}
	cases := []struct {
		name string
		edit func(*Policy)
		want string // "" means valid
	}{
		{"minimal", func(p *Policy) {}, ""},
		{"extra with reason", func(p *Policy) {
			p.ExtraSyscalls = []Syscall{{Name: "sysinfo", Reason: "free memory"}}
		}, ""},
		{"extra already allowed", func(p *Policy) { p.ExtraSyscalls = []Syscall{{Name: "read", Reason: "x"}} }, ""},
		{"fs dir", func(p *Policy) { p.ReadWriteDirFDs = []int{5} }, ""},
		{"empty kind", func(p *Policy) { p.Kind = "" }, "kind"},
		{"kind with slash", func(p *Policy) { p.Kind = "../x" }, "only a-z"},
		{"long kind", func(p *Policy) { p.Kind = strings.Repeat("a", 65) }, "kind"},
		{"unknown profile", func(p *Policy) { p.Syscalls = "everything" }, "unknown syscall profile"},
		{"forbidden extra", func(p *Policy) { p.ExtraSyscalls = []Syscall{{Name: "execve", Reason: "plugins"}} }, "never granted"},
		{"forbidden ptrace", func(p *Policy) { p.ExtraSyscalls = []Syscall{{Name: "ptrace", Reason: "x"}} }, "never granted"},
		{"socket", func(p *Policy) { p.ExtraSyscalls = []Syscall{{Name: "socket", Reason: "x"}} }, "never granted"},
		{"widen clone", func(p *Policy) { p.ExtraSyscalls = []Syscall{{Name: "clone", Reason: "x"}} }, "cannot be widened"},
		{"widen ioctl", func(p *Policy) { p.ExtraSyscalls = []Syscall{{Name: "ioctl", Reason: "x"}} }, "cannot be widened"},
		{"unknown extra", func(p *Policy) { p.ExtraSyscalls = []Syscall{{Name: "frobnicate", Reason: "x"}} }, "not known"},
		{"no reason", func(p *Policy) { p.ExtraSyscalls = []Syscall{{Name: "sysinfo", Reason: " "}} }, "reason"},
		{"stdio as dir", func(p *Policy) { p.ReadOnlyDirFDs = []int{1} }, "out of range"},
		{"huge fd", func(p *Policy) { p.ReadWriteDirFDs = []int{1 << 30} }, "out of range"},
		{"too many dirs", func(p *Policy) { p.ReadOnlyDirFDs = make([]int, 17) }, "directory fds"},
		{"too many extras", func(p *Policy) { p.ExtraSyscalls = make([]Syscall, 65) }, "extra syscalls"},
	}
	for _, c := range cases {
		p := good
		c.edit(&p)
		err := p.Validate()
		if c.want == "" {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrPolicy) {
			t.Errorf("%s: %v, want ErrPolicy containing %q", c.name, err, c.want)
		}
	}
}

func TestParsePolicy(t *testing.T) {
	p := Policy{Kind: "fs", Syscalls: ProfileFS, ReadWriteDirFDs: []int{5},
		ExtraSyscalls: []Syscall{{Name: "sysinfo", Reason: "r"}}}
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParsePolicy(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Kind != p.Kind || got.Syscalls != p.Syscalls || !slices.Equal(got.ReadWriteDirFDs, p.ReadWriteDirFDs) ||
		!slices.Equal(got.ExtraSyscalls, p.ExtraSyscalls) {
		t.Errorf("round trip: %+v, want %+v", got, p)
	}
	for _, bad := range []string{
		`{"kind":"x","syscalls":"block","caps":["CAP_SYS_ADMIN"]}`, // unknown field
		`{"kind":"x","syscalls":"block"`,                           // truncated
		`{"kind":"x","syscalls":"root"}`,                           // unknown profile
		`[]`,
	} {
		if _, err := ParsePolicy([]byte(bad)); err == nil {
			t.Errorf("ParsePolicy(%s) accepted", bad)
		}
	}
}

func TestDefaultPolicy(t *testing.T) {
	for _, c := range []struct {
		kind string
		prof Profile
		dirs []int
	}{{"blk", ProfileBlock, nil}, {"net", ProfileNet, nil}, {"console", ProfileMinimal, nil}, {"fs", ProfileFS, []int{7}}} {
		p, err := DefaultPolicy(c.kind, 7)
		if err != nil || p.Syscalls != c.prof || !slices.Equal(p.ReadWriteDirFDs, c.dirs) || p.Validate() != nil {
			t.Errorf("%s: %+v %v", c.kind, p, err)
		}
	}
	if _, err := DefaultPolicy("gpu", 0); err == nil {
		t.Error("unknown kind accepted")
	}
}

func TestDefaultLimits(t *testing.T) {
	for _, c := range []struct {
		kind  string
		files uint64
	}{{"blk", DefaultOpenFiles}, {"net", DefaultOpenFiles}, {"fs", FSOpenFiles}, {"third-party", DefaultOpenFiles}} {
		l, err := DefaultLimits(c.kind).withDefaults()
		if err != nil || l.OpenFiles != c.files || l.DataBytes != DefaultDataBytes {
			t.Errorf("%s: %+v %v", c.kind, l, err)
		}
	}
}

func TestParseLayers(t *testing.T) {
	got, err := ParseLayers("seccomp, landlock,seccomp")
	if err != nil || !slices.Equal(got, []Layer{LayerLandlock, LayerSeccomp}) {
		t.Errorf("%v %v", got, err)
	}
	got, err = ParseLayers("all")
	if err != nil || len(got) != len(Disableable()) {
		t.Errorf("all: %v %v", got, err)
	}
	if got, err = ParseLayers(""); err != nil || len(got) != 0 {
		t.Errorf("empty: %v %v", got, err)
	}
	for _, bad := range []string{"rlimits", "no_new_privs", "capabilities", "everything"} {
		if _, err := ParseLayers(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	d, err := normalizeDisabled([]Layer{LayerNamespaces})
	if err != nil || !slices.Equal(d, []Layer{LayerNamespaces, LayerRoot}) {
		t.Errorf("namespaces must imply root: %v %v", d, err)
	}
}

func TestLaunchEnvRoundTrip(t *testing.T) {
	e := launchEnv{Version: launchEnvVersion, Root: "/tmp", Disabled: []Layer{LayerSeccomp}, Limits: Limits{OpenFiles: 64, FileBytes: 1 << 30},
		Kind: "blk-raw", Syscalls: ProfileBlock, Extra: []Syscall{{Name: "sysinfo", Reason: "r"}},
		ExecFD: 5, ChanFD: 6, DirFDs: []int{4}, SocketDir: "/tmp/krun-x/plugin-dir1"}
	kv := e.encode()
	got, err := decodeLaunchEnv(strings.TrimPrefix(kv, envName+"="))
	if err != nil {
		t.Fatal(err)
	}
	if got.Root != "/tmp" || !slices.Equal(got.Disabled, e.Disabled) || got.Limits.OpenFiles != 64 || got.Limits.FileBytes != 1<<30 ||
		got.Limits.DataBytes != DefaultDataBytes || got.Kind != "blk-raw" || got.Syscalls != ProfileBlock ||
		len(got.Extra) != 1 || got.ExecFD != 5 || got.ChanFD != 6 || !slices.Equal(got.DirFDs, []int{4}) ||
		got.SocketDir != e.SocketDir {
		t.Errorf("%+v", got)
	}
	const ok = `"syscalls":"block","exec_fd":5,"chan_fd":6`
	if _, err := decodeLaunchEnv(`{"v":2,"root":"/tmp",` + ok + `}`); err != nil {
		t.Errorf("minimal settings refused: %v", err)
	}
	for _, bad := range []string{
		`{"v":2,"root":"/",` + ok + `}`,
		`{"v":2,"root":"relative",` + ok + `}`,
		`{"v":2,"root":"/tmp","limits":{"open_files":2},` + ok + `}`,
		`{"v":2,"root":"/tmp","bogus":1,` + ok + `}`,
		`{"v":1,"root":"/tmp",` + ok + `}`,
		`{"v":2,"root":"/tmp","syscalls":"block","exec_fd":5,"chan_fd":5}`,
		`{"v":2,"root":"/tmp","syscalls":"block","exec_fd":2,"chan_fd":6}`,
		`{"v":2,"root":"/tmp","syscalls":"everything","exec_fd":5,"chan_fd":6}`,
		`{"v":2,"root":"/tmp","extra":[{"name":"execve","reason":"r"}],` + ok + `}`,
		`{"v":2,"root":"/tmp","socket_dir":"/",` + ok + `}`,
	} {
		if _, err := decodeLaunchEnv(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

func TestKindProfile(t *testing.T) {
	for kind, want := range map[string]Profile{
		"blk-raw": ProfileBlock, "blk-qcow2": ProfileBlock, "img": ProfileBlock, "net-passt": ProfileNet, "console": ProfileMinimal,
		"fs-virtio": ProfileFS, "fs": ProfileFS, "null": ProfileIO, "": ProfileIO, "blk-custom": ProfileIO,
	} {
		if got := KindProfile(kind); got != want {
			t.Errorf("KindProfile(%q) = %s, want %s", kind, got, want)
		}
	}
}

// The start-up calls are only ever granted by the launch layer, and the
// launch layer grants nothing forbidden without an argument limit except
// what creating the gRPC listener and stacking Restrict's domain need.
func TestLaunchLayer(t *testing.T) {
	unconditional := map[string]bool{}
	for _, r := range launchLayer(9) {
		if r.reason == "" {
			t.Errorf("launch rule %s has no reason", r.name)
		}
		if r.alts == nil {
			unconditional[r.name] = true
		}
	}
	for _, f := range ForbiddenSyscalls() {
		if unconditional[f] && !slices.Contains([]string{"bind", "listen", "landlock_create_ruleset",
			"landlock_add_rule", "landlock_restrict_self"}, f) {
			t.Errorf("the launch layer grants forbidden %s without argument limits", f)
		}
	}
	for _, prof := range Profiles() {
		rs, err := policyRules(Policy{Kind: "t", Syscalls: prof})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			if r.layer == layerLaunch {
				t.Errorf("profile %s has the launch rule %s", prof, r.name)
			}
		}
	}
}

func TestRulesHaveReasons(t *testing.T) {
	nums := syscallNumbers()
	for _, prof := range Profiles() {
		rs, err := Rules(Policy{Kind: "t", Syscalls: prof})
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, r := range rs {
			if r.Reason == "" || r.Layer == "" {
				t.Errorf("%s: %s has no reason or layer", prof, r.Syscall)
			}
			if _, ok := nums[r.Syscall]; !ok {
				t.Errorf("%s: %s unknown on this architecture", prof, r.Syscall)
			}
			if seen[r.Syscall] {
				t.Errorf("%s: %s listed twice", prof, r.Syscall)
			}
			seen[r.Syscall] = true
			if slices.Contains(ForbiddenSyscalls(), r.Syscall) {
				t.Errorf("%s allows forbidden %s", prof, r.Syscall)
			}
		}
	}
	// A declared extra merges into a conditional rule only as unconditional
	// and is refused by Validate; policyRules itself merges by OR.
	rs, err := policyRules(Policy{Kind: "t", Syscalls: ProfileBlock})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		if r.name == "ioctl" && (len(r.alts) != 5 || !strings.Contains(r.args, "TCGETS") || !strings.Contains(r.args, "BLKZEROOUT")) {
			t.Errorf("block ioctl should merge both layers' requests: %d alternatives, %q", len(r.alts), r.args)
		}
	}
}

func TestParseHostID(t *testing.T) {
	for in, want := range map[string]int{"": 0, "1": 1, "65534": 65534, "4294967294": 4294967294} {
		if got, err := ParseHostID(in); err != nil || got != want {
			t.Errorf("ParseHostID(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"0", "-1", "4294967295", "4294967296", "nobody", " 1", "0x10"} {
		if _, err := ParseHostID(bad); err == nil {
			t.Errorf("ParseHostID(%q) accepted", bad)
		}
	}
	if _, err := ParseHostID("0"); err == nil || !strings.Contains(err.Error(), "never run as host root") {
		t.Errorf("ParseHostID(0): %v", err)
	}
}
