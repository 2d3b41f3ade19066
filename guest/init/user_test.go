package main

import (
	"errors"
	"io"
	"os"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fileOf returns an opener for content; "" with missing set is a file that
// does not exist.
func fileOf(content string, missing bool) func() (io.ReadCloser, error) {
	return func() (io.ReadCloser, error) {
		if missing {
			return nil, &os.PathError{Op: "open", Path: "x", Err: os.ErrNotExist}
		}
		return io.NopCloser(strings.NewReader(content)), nil
	}
}

const testPasswd = `root:x:0:0:root:/root:/bin/sh
# a comment
+nis
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash
broken:x:notanumber:1:::
short:x:7
nohome:x:1002:1002::::
bob:x:1001:100:Bob:/home/bob:/bin/sh
alice:x:2000:2000:second alice:/elsewhere:/bin/sh
`

const testGroup = `root:x:0:
users:x:100:alice,bob
wheel:x:10:alice
staff:x:50:bob,carol
alice:x:1000:
dup:x:10:alice
badgid:x:abc:alice
docker:x:999:carol,alice
`

func TestResolveUser(t *testing.T) {
	tests := []struct {
		name          string
		spec          string
		passwd, group string
		noPasswd      bool
		noGroup       bool
		want          *identity
		wantErr       string
	}{
		{name: "name", spec: "alice", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 1000, gid: 1000, groups: []uint32{100, 10, 999}, home: "/home/alice"}},
		{name: "numeric in passwd", spec: "1001", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 1001, gid: 100, groups: []uint32{50}, home: "/home/bob"}},
		{name: "numeric not in passwd", spec: "4242", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 4242, gid: 0, home: "/"}},
		{name: "numeric without files", spec: "4242:77", noPasswd: true, noGroup: true,
			want: &identity{uid: 4242, gid: 77, home: "/"}},
		{name: "root", spec: "root", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 0, gid: 0, home: "/root"}},
		// With GROUP there are no supplementary groups, as in runc and
		// podman: naming a group sheds the others (from review).
		{name: "name with group name", spec: "alice:staff", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 1000, gid: 50, home: "/home/alice"}},
		{name: "name with group id", spec: "bob:10", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 1001, gid: 10, home: "/home/bob"}},
		{name: "number in passwd with group name", spec: "1001:wheel", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 1001, gid: 10, home: "/home/bob"}},
		{name: "number not in passwd with group name", spec: "4242:staff", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 4242, gid: 50, home: "/"}},
		{name: "primary group listed too", spec: "bob", passwd: testPasswd,
			group: "users:x:100:bob\nother:x:7:bob\nusers2:x:100:bob\n",
			want:  &identity{uid: 1001, gid: 100, groups: []uint32{7}, home: "/home/bob"}},
		{name: "home with NUL is /", spec: "eve", passwd: "eve:x:5:5::/a\x00b:/bin/sh\n",
			want: &identity{uid: 5, gid: 5, home: "/"}},
		{name: "home too long is /", spec: "eve", passwd: "eve:x:5:5::/" + strings.Repeat("a", maxHome) + ":/bin/sh\n",
			want: &identity{uid: 5, gid: 5, home: "/"}},
		{name: "first entry of a duplicated name wins", spec: "alice", passwd: testPasswd, group: "",
			want: &identity{uid: 1000, gid: 1000, home: "/home/alice"}},
		{name: "empty home is /", spec: "nohome", passwd: testPasswd, group: testGroup,
			want: &identity{uid: 1002, gid: 1002, home: "/"}},
		{name: "unknown name", spec: "mallory", passwd: testPasswd, group: testGroup, wantErr: `no user "mallory"`},
		{name: "name without passwd", spec: "alice", noPasswd: true, wantErr: `no user "alice"`},
		{name: "malformed line is not a user", spec: "broken", passwd: testPasswd, wantErr: `no user "broken"`},
		{name: "short line is not a user", spec: "short", passwd: testPasswd, wantErr: `no user "short"`},
		// Six fields (no shell): musl skips the line, as RUN.md says.
		{name: "six fields is not a user", spec: "six", passwd: "six:x:5:5:gecos:/home/six\n", wantErr: `no user "six"`},
		{name: "six fields is not a uid's entry", spec: "5", passwd: "six:x:5:5:gecos:/home/six\n",
			want: &identity{uid: 5, gid: 0, home: "/"}},
		{name: "seven fields, empty shell", spec: "seven", passwd: "seven:x:5:5:gecos:/home/seven:\n",
			want: &identity{uid: 5, gid: 5, home: "/home/seven"}},
		{name: "NIS line is not a user", spec: "+nis", passwd: testPasswd, wantErr: "not allowed"},
		{name: "unknown group", spec: "alice:nogroup", passwd: testPasswd, group: testGroup, wantErr: `no group "nogroup"`},
		{name: "group with bad gid", spec: "alice:badgid", passwd: testPasswd, group: testGroup, wantErr: `no group "badgid"`},
		{name: "bad spec", spec: "al ice", passwd: testPasswd, wantErr: "not allowed"},
		{name: "id out of range", spec: "4294967295", passwd: testPasswd, wantErr: "out of range"},
		{name: "empty group", spec: "alice:", passwd: testPasswd, wantErr: "empty group"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := resolveUser(tt.spec, fileOf(tt.passwd, tt.noPasswd), fileOf(tt.group, tt.noGroup))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), "\n") {
					t.Fatalf("resolveUser(%q) = %+v, %v; want one line with %q", tt.spec, got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("resolveUser(%q): %v", tt.spec, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("resolveUser(%q) = %+v, want %+v", tt.spec, got, tt.want)
			}
		})
	}
}

func TestResolveUserFileErrors(t *testing.T) {
	big := strings.Repeat("x:x:1:1:x:/x:/x\n", maxAccountFile/16+1)
	if _, err := resolveUser("y", fileOf(big, false), fileOf("", false)); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("a huge /etc/passwd: %v", err)
	}
	if _, err := resolveUser("x", fileOf("x:x:1:1:x:/x:/x\n", false), fileOf(big, false)); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("a huge /etc/group: %v", err)
	}
	failing := func() (io.ReadCloser, error) { return nil, errors.New("permission denied") }
	if _, err := resolveUser("alice", failing, fileOf("", false)); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("an unreadable /etc/passwd: %v", err)
	}
}

// TestOpenAccountFile: openFile opens nothing but a regular file (a FIFO
// would block PID 1, a device may act on open) and reads a file no
// further than its size, so a procfs file that never ends (/proc/kmsg)
// reads as empty (from review).
func TestOpenAccountFile(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/passwd", []byte(testPasswd), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(dir+"/fifo", 0o644); err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{"null": "/dev/null", "status": "/proc/self/status", "loop": dir + "/loop"} {
		if err := os.Symlink(target, dir+"/"+name); err != nil {
			t.Fatal(err)
		}
	}
	r, err := openFile(dir + "/status")()
	if err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(r); err != nil || len(b) != 0 {
		t.Fatalf("a procfs file read %d bytes (%v), want none: its size says 0", len(b), err)
	}
	r.Close()
	tests := []struct {
		file, user string
		wantErr    string // "" for success
	}{
		{"passwd", "alice", ""},
		{"fifo", "alice", "not a regular file"},
		{"null", "alice", "not a regular file"},
		{"loop", "alice", "too many levels"},
		{"status", "alice", `no user "alice"`}, // read as empty
		{"missing", "4242", ""},                // a missing file is empty
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			done := make(chan error, 1)
			go func() {
				_, err := resolveUser(tt.user, openFile(dir+"/"+tt.file), openFile(dir+"/group"))
				done <- err
			}()
			select {
			case err := <-done:
				if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("resolveUser blocked on the file")
			}
		})
	}
}

func FuzzResolveUser(f *testing.F) {
	f.Add("alice:staff", testPasswd, testGroup)
	f.Add("1001", testPasswd, testGroup)
	f.Add("bob", testPasswd, testGroup)          // supplementary groups from the group file
	f.Add("1001:100", testPasswd, testGroup)     // numeric user and group
	f.Add("nohome:wheel", testPasswd, testGroup) // an entry without a home
	f.Add("x", "x:x:1:2:a:b:c\n", "g:x:3:x,y\n")
	f.Fuzz(func(t *testing.T, spec, passwd, group string) {
		id, err := resolveUser(spec, fileOf(passwd, false), fileOf(group, false))
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error %q", err)
			}
			return
		}
		if id.home == "" {
			t.Fatal("empty home")
		}
		if strings.Contains(spec, ":") && len(id.groups) > 0 {
			t.Fatalf("supplementary groups %v with an explicit group", id.groups)
		}
	})
}

// TestWithHome: a container's program without HOME gets its user's home
// from the root's /etc/passwd, or / without an entry, as runc sets it; a
// HOME given (even empty) stays.
func TestWithHome(t *testing.T) {
	tests := []struct {
		name   string
		env    []string
		uid    uint32
		passwd string
		noFile bool
		want   []string
	}{
		{"from passwd", []string{"PATH=/bin"}, 1000, testPasswd, false, []string{"PATH=/bin", "HOME=/home/alice"}},
		{"root", nil, 0, testPasswd, false, []string{"HOME=/root"}},
		{"no entry", []string{"A=1"}, 4242, testPasswd, false, []string{"A=1", "HOME=/"}},
		{"no passwd", nil, 1000, "", true, []string{"HOME=/"}},
		{"entry without home", nil, 1002, testPasswd, false, []string{"HOME=/"}},
		{"given", []string{"HOME=/srv"}, 1000, testPasswd, false, []string{"HOME=/srv"}},
		{"given empty", []string{"HOME="}, 1000, testPasswd, false, []string{"HOME="}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := withHome(tt.env, tt.uid, fileOf(tt.passwd, tt.noFile)); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("withHome(%q, %d) = %q, want %q", tt.env, tt.uid, got, tt.want)
			}
		})
	}
}
