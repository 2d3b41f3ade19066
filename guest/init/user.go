package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/initconfig"
)

// maxAccountFile bounds how much of /etc/passwd and /etc/group is read:
// they belong to the root's owner, and krun-init must not run out of
// memory or time on them.
const maxAccountFile = 4 << 20

// maxGroups is the kernel's NGROUPS_MAX.
const maxGroups = 65536

// maxHome bounds a home directory taken from /etc/passwd (PATH_MAX).
const maxHome = 4096

// identity is a resolved --user.
type identity struct {
	uid, gid uint32
	groups   []uint32 // supplementary groups, without gid
	home     string
}

// passwdEntry is one line of /etc/passwd.
type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

// resolveUser resolves USER[:GROUP] (names or decimal ids) as runc and
// podman do: a name must be in passwd and gives its uid, primary gid and
// home; a number need not be (then gid 0, home /); GROUP, a name in group
// or a number, replaces the primary gid, and then there are no
// supplementary groups; without it they are the groups of group that list
// the user's name. A missing file counts as empty. Malformed lines are
// skipped, as the C library does. Both files are read as a stream, once.
func resolveUser(spec string, passwd, group func() (io.ReadCloser, error)) (*identity, error) {
	if err := initconfig.ValidUser(spec); err != nil {
		return nil, err
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	id := &identity{home: "/"}
	uid, numericUser, _ := initconfig.ParseID(userPart)
	var ent *passwdEntry
	err := scanAccounts(passwd, "/etc/passwd", 7, func(f []string) bool {
		if len(f) < 7 || f[0] == "" { // musl skips a line without all 7
			return true
		}
		u, ok1 := parseIDField(f[2])
		g, ok2 := parseIDField(f[3])
		if !ok1 || !ok2 {
			return true
		}
		if (numericUser && u == uid) || (!numericUser && f[0] == userPart) {
			ent = &passwdEntry{name: f[0], uid: u, gid: g, home: f[5]}
			return false
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	switch {
	case ent != nil:
		id.uid, id.gid = ent.uid, ent.gid
		if ent.home != "" && len(ent.home) <= maxHome && !strings.ContainsRune(ent.home, 0) {
			id.home = ent.home
		}
	case numericUser:
		id.uid = uid
	default:
		return nil, fmt.Errorf("no user %q in the root's /etc/passwd", userPart)
	}
	gid, numericGroup, _ := initconfig.ParseID(groupPart)
	wantName := hasGroup && !numericGroup
	wantMembers := !hasGroup && ent != nil
	if hasGroup && numericGroup {
		id.gid = gid
	}
	if !wantName && !wantMembers {
		return id, nil
	}
	found := false
	seen := map[uint32]bool{}
	err = scanAccounts(group, "/etc/group", 4, func(f []string) bool {
		if len(f) < 4 {
			return true
		}
		g, ok := parseIDField(f[2])
		if !ok {
			return true
		}
		if wantName && f[0] == groupPart {
			id.gid, found = g, true
			return false
		}
		if wantMembers && !seen[g] && member(f[3], ent.name) {
			seen[g] = true
			id.groups = append(id.groups, g)
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	if wantName && !found {
		return nil, fmt.Errorf("no group %q in the root's /etc/group", groupPart)
	}
	id.groups = slices.DeleteFunc(id.groups, func(g uint32) bool { return g == id.gid })
	if len(id.groups) > maxGroups {
		return nil, fmt.Errorf("user %q is in more than %d groups", ent.name, maxGroups)
	}
	return id, nil
}

// member reports whether the comma-separated list has name, without
// allocating (a group line may list millions).
func member(list, name string) bool {
	for list != "" {
		var m string
		m, list, _ = strings.Cut(list, ",")
		if m == name {
			return true
		}
	}
	return false
}

// parseIDField parses an id field of passwd or group.
func parseIDField(s string) (uint32, bool) {
	id, numeric, err := initconfig.ParseID(s)
	return id, numeric && err == nil
}

// scanAccounts calls fn with the colon-separated fields (at most n) of
// each line of an account file until fn returns false; comments, blank
// lines and NIS "+" and "-" lines are skipped. A file that does not exist
// reads as empty. Reading stops at maxAccountFile: a file whose answer
// lies beyond it is an error (one answered earlier is not read further).
func scanAccounts(open func() (io.ReadCloser, error), name string, n int, fn func(f []string) bool) error {
	r, err := open()
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("the root's %s: %w", name, err)
	}
	defer r.Close()
	lr := &io.LimitedReader{R: r, N: maxAccountFile + 1}
	sc := bufio.NewScanner(lr)
	sc.Buffer(make([]byte, 0, 4096), maxAccountFile+1)
	for sc.Scan() {
		if lr.N == 0 {
			break
		}
		line := sc.Text()
		if line == "" || line[0] == '#' || line[0] == '+' || line[0] == '-' {
			continue
		}
		if !fn(strings.SplitN(line, ":", n)) {
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read the root's %s: %w", name, err)
	}
	if lr.N == 0 {
		return fmt.Errorf("the root's %s is larger than %d bytes", name, maxAccountFile)
	}
	return nil
}

// openFile opens name for resolveUser without opening anything but a
// regular file: a FIFO would block PID 1, a device may act on open (a
// watchdog), and a procfs file (/proc/kmsg) never ends. The path is
// opened O_PATH, checked, then reopened through /proc/self/fd, and read
// no further than its size (procfs files say 0).
func openFile(name string) func() (io.ReadCloser, error) {
	return func() (io.ReadCloser, error) {
		fd, err := unix.Open(name, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, &os.PathError{Op: "open", Path: name, Err: err}
		}
		defer unix.Close(fd)
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return nil, &os.PathError{Op: "stat", Path: name, Err: err}
		}
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return nil, errors.New("not a regular file")
		}
		// The reopen goes through /proc, which must be the guest's
		// procfs (no share may be mounted there: initconfig refuses it).
		var sfs unix.Statfs_t
		if err := unix.Statfs("/proc/self/fd", &sfs); err != nil || sfs.Type != unix.PROC_SUPER_MAGIC {
			return nil, errors.New("no procfs at /proc to open it through")
		}
		f, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(fd), os.O_RDONLY|unix.O_NOCTTY, 0)
		if err != nil {
			return nil, err
		}
		return struct {
			io.Reader
			io.Closer
		}{io.LimitReader(f, min(st.Size, maxAccountFile+1)), f}, nil
	}
}

// withHome returns env with HOME set when it has none, as runc does for a
// container's process: the home of uid in the root's /etc/passwd, or /
// when it has no entry (or the file cannot be read).
func withHome(env []string, uid uint32, passwd func() (io.ReadCloser, error)) []string {
	for _, kv := range env {
		if strings.HasPrefix(kv, "HOME=") {
			return env
		}
	}
	home := "/"
	noGroups := func() (io.ReadCloser, error) { return nil, os.ErrNotExist }
	if id, err := resolveUser(strconv.FormatUint(uint64(uid), 10), passwd, noGroups); err == nil {
		home = id.home
	}
	return append(env, "HOME="+home)
}
