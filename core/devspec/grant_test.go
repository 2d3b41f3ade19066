package devspec

import (
	"strings"
	"testing"
)

func TestSyscallGrantsAdd(t *testing.T) {
	tests := []struct {
		name  string
		value []string
		want  string // error text; "" for none
		kind  string
		calls []string
	}{
		{"one call", []string{"hello=sysinfo"}, "", "hello", []string{"sysinfo"}},
		{"two calls", []string{"hello=sysinfo,uname"}, "", "hello", []string{"sysinfo", "uname"}},
		{"already in the profile", []string{"hello=read"}, "", "hello", []string{"read"}},
		{"two kinds", []string{"a=sysinfo", "b=uname"}, "", "b", []string{"uname"}},
		{"no kind", []string{"sysinfo"}, "want KIND=NAME[,NAME...]", "", nil},
		{"bad kind", []string{"Hello=sysinfo"}, "plugin kind", "", nil},
		{"empty list", []string{"hello="}, "empty system call name", "", nil},
		{"trailing comma", []string{"hello=sysinfo,"}, "empty system call name", "", nil},
		{"listed twice", []string{"hello=sysinfo,sysinfo"}, `"sysinfo" listed twice`, "", nil},
		{"kind twice", []string{"hello=sysinfo", "hello=uname"}, "hello given twice", "", nil},
		{"forbidden", []string{"hello=execve"}, "never granted", "", nil},
		{"io_uring", []string{"hello=io_uring_setup"}, "never granted", "", nil},
		{"argument-limited", []string{"hello=ioctl"}, "cannot be widened", "", nil},
		{"unknown", []string{"hello=frobnicate"}, "not known", "", nil},
		{"control characters", []string{"hello\x1b[31m=sysinfo"}, "plugin kind", "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := SyscallGrants{}
			var err error
			for _, v := range tt.value {
				if err = g.Add(v); err != nil {
					break
				}
			}
			if tt.want != "" {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Add(%q) = %v, want an error containing %q", tt.value, err, tt.want)
				}
				if strings.ContainsAny(err.Error(), "\x1b\n") {
					t.Errorf("error %q carries control characters", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Add(%q): %v", tt.value, err)
			}
			got := g[tt.kind]
			if len(got) != len(tt.calls) {
				t.Fatalf("grants for %s = %v, want %v", tt.kind, got, tt.calls)
			}
			for i, c := range got {
				if c.Name != tt.calls[i] || c.Reason != GrantReason {
					t.Errorf("grant %d = %+v, want %s with the reason %q", i, c, tt.calls[i], GrantReason)
				}
			}
		})
	}
}

func TestSyscallGrantsCheck(t *testing.T) {
	hello, err := ParsePlugin("hello,x=1")
	if err != nil {
		t.Fatal(err)
	}
	disk, err := Parse("disk", "path=/x.img,format=raw")
	if err != nil {
		t.Fatal(err)
	}
	g := SyscallGrants{}
	if err := g.Check([]Spec{disk}); err != nil {
		t.Errorf("no grants: %v", err)
	}
	if err := g.Add("hello=sysinfo"); err != nil {
		t.Fatal(err)
	}
	if err := g.Check([]Spec{disk, hello}); err != nil {
		t.Errorf("grant to a --plugin kind: %v", err)
	}
	if err := g.Check([]Spec{disk}); err == nil || !strings.Contains(err.Error(), "no --plugin hello") {
		t.Errorf("grant without its --plugin: %v", err)
	}
	var none SyscallGrants
	if err := none.Check(nil); err != nil {
		t.Errorf("nil grants: %v", err)
	}
}
