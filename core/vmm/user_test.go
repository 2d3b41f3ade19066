package vmm

import (
	"errors"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/guest/container"
)

// TestSetUserSpec: --user is passed to krun-init unresolved (it resolves
// names in the root), replaces numeric ids, and drops the default HOME
// (krun-init sets the user's) unless the program's environment sets one.
func TestSetUserSpec(t *testing.T) {
	tests := []struct {
		name     string
		spec     string
		env      []string
		numeric  bool // SetUser after SetUserSpec
		wantUser string
		wantHome string // "" means no HOME in the environment
	}{
		{name: "name", spec: "alice:staff", wantUser: "alice:staff"},
		{name: "number", spec: "1000", wantUser: "1000"},
		{name: "HOME from --env stays", spec: "alice", env: []string{"HOME=/srv"}, wantUser: "alice", wantHome: "/srv"},
		{name: "SetUser replaces it", spec: "alice", numeric: true, wantHome: "/root"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := prepTestExecWith(t, nil, func(c *Context) {
				if err := c.SetExec("/bin/sh", nil, tt.env); err != nil {
					t.Fatal(err)
				}
				c.SetUser(7, 8, []uint32{9})
				if err := c.SetUserSpec(tt.spec); err != nil {
					t.Fatal(err)
				}
				if tt.numeric {
					c.SetUser(7, 8, []uint32{9})
				}
			})
			cfg := c.exec.cfg
			if cfg.User != tt.wantUser {
				t.Errorf("user %q, want %q", cfg.User, tt.wantUser)
			}
			if !tt.numeric && (cfg.UID != 0 || cfg.GID != 0 || cfg.AdditionalGIDs != nil) {
				t.Errorf("numeric ids %d:%d %v kept beside --user", cfg.UID, cfg.GID, cfg.AdditionalGIDs)
			}
			if tt.numeric && (cfg.UID != 7 || cfg.GID != 8 || len(cfg.AdditionalGIDs) != 1) {
				t.Errorf("SetUser after SetUserSpec: ids %d:%d %v, want 7:8 [9]", cfg.UID, cfg.GID, cfg.AdditionalGIDs)
			}
			home, ok := cfg.Getenv("HOME")
			if tt.wantHome == "" && ok {
				t.Errorf("HOME=%s left for krun-init to replace", home)
			}
			if tt.wantHome != "" && home != tt.wantHome {
				t.Errorf("HOME %q, want %q", home, tt.wantHome)
			}
			if err := cfg.Validate(); err != nil {
				t.Errorf("config: %v", err)
			}
		})
	}
	// SetEnv's HOME stays too (from review).
	c := prepTestExecWith(t, nil, func(c *Context) {
		if err := c.SetUserSpec("alice"); err != nil {
			t.Fatal(err)
		}
		c.SetEnv([]string{"PATH=/bin", "HOME=/data"})
	})
	if h, _ := c.exec.cfg.Getenv("HOME"); h != "/data" {
		t.Errorf("SetEnv's HOME with a user spec: %q, want /data", h)
	}
	// krun-init resolves a spec only in a root it has entered, not in a
	// container's (from review).
	_, err := prepTestExecErr(t, nil, func(c *Context) {
		if err := c.SetContainer(&container.Setup{}); err != nil {
			t.Fatal(err)
		}
		if err := c.SetUserSpec("alice"); err != nil {
			t.Fatal(err)
		}
	})
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "SetContainer") {
		t.Errorf("a user spec with a container: %v", err)
	}
	c = NewContext(nil)
	for _, bad := range []string{"", "a b", "alice:", ":x", "4294967295"} {
		if err := c.SetUserSpec(bad); !errors.Is(err, ErrConfig) {
			t.Errorf("SetUserSpec(%q): %v, want ErrConfig", bad, err)
		}
	}
}
