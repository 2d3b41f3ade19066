package layering

import (
	"bufio"
	"bytes"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

const module = "github.com/krun-core/krun-core"

// rule: no package matching from may depend, directly or through others
// (go list's Deps, test files excluded), on a package matching any of
// banned. A pattern "p/..." matches p and everything below it.
type rule struct {
	from   []string
	banned []string
	why    string
}

var rules = []rule{
	{
		from:   []string{"core/..."},
		banned: []string{"devices/...", "disk/...", "plugins/...", "testguest/...", "imgtool/...", "pluginsdk/..."},
		why:    "the core talks to devices only through plugins; the names both sides share are in devopts",
	},
	{
		from:   []string{"devices/...", "disk/...", "plugins/...", "pluginsdk/...", "vhostuser/...", "virtq/...", "guestmem/..."},
		banned: []string{"core/...", "cmd/..."},
		why:    "plugin-side code does not depend on the host",
	},
	{
		from:   []string{"devopts/..."},
		banned: []string{"..."},
		why:    "devopts is a leaf: host and plugins import it, it imports nothing of this module",
	},
	{
		from:   []string{"cmd/krun-core"},
		banned: []string{"testguest/...", "internal/vmtest/...", "internal/netnstest/..."},
		why:    "the test driver stays out of the production binary (cmd/krun-bench has it)",
	},
}

// match reports whether the module-relative package path p matches pat.
func match(pat, p string) bool {
	if pat == "..." {
		return true
	}
	if base, ok := strings.CutSuffix(pat, "/..."); ok {
		return p == base || strings.HasPrefix(p, base+"/")
	}
	return p == pat
}

func goCommand(t *testing.T) string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := exec.LookPath(p); err != nil {
		t.Skip("no go command (neither in $PATH nor in GOROOT) to list the packages with")
	}
	return p
}

// deps lists every package of the module with its module-internal
// dependencies (module-relative paths).
func deps(t *testing.T) map[string][]string {
	cmd := exec.Command(goCommand(t), "list", "-f", "{{.ImportPath}}{{range .Deps}} {{.}}{{end}}", module+"/...")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v: %s", err, stderr.String())
	}
	m := map[string][]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		pkg, ok := strings.CutPrefix(f[0], module+"/")
		if !ok {
			continue
		}
		var own []string
		for _, d := range f[1:] {
			if r, ok := strings.CutPrefix(d, module+"/"); ok {
				own = append(own, r)
			}
		}
		m[pkg] = own
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestImportRules(t *testing.T) {
	all := deps(t)
	if len(all) < 20 || all["core/vmm"] == nil {
		t.Fatalf("go list found %d packages, core/vmm with no dependencies: not the module this test expects", len(all))
	}
	for _, r := range rules {
		checked := 0
		for pkg, ds := range all {
			if !matchAny(r.from, pkg) {
				continue
			}
			checked++
			for _, d := range ds {
				if matchAny(r.banned, d) {
					t.Errorf("%s depends on %s: %s", pkg, d, r.why)
				}
			}
		}
		if checked == 0 {
			t.Errorf("rule %v matches no package", r.from)
		}
	}
}

func matchAny(pats []string, p string) bool {
	for _, pat := range pats {
		if match(pat, p) {
			return true
		}
	}
	return false
}

// The rules must be able to fail: a package that breaks each of them.
func TestRulesMatch(t *testing.T) {
	for _, tc := range []struct {
		pat, p string
		want   bool
	}{
		{"core/...", "core", true},
		{"core/...", "core/vmm", true},
		{"core/...", "corex/vmm", false},
		{"disk/...", "disk", true},
		{"disk/...", "devices/disk", false},
		{"cmd/krun-core", "cmd/krun-core", true},
		{"cmd/krun-core", "cmd/krun-bench", false},
		{"...", "sandbox", true},
	} {
		if got := match(tc.pat, tc.p); got != tc.want {
			t.Errorf("match(%q, %q) = %v, want %v", tc.pat, tc.p, got, tc.want)
		}
	}
}
