package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"syscall"

	"github.com/krun-core/krun-core/guest/initconfig"
)

// maxAccountFile bounds how much of /etc/passwd and /etc/group is read:
// they belong to the root's owner, and krun-init must not run out of
// memory on them.
const maxAccountFile = 4 << 20

// maxGroups is the kernel's NGROUPS_MAX.
const maxGroups = 65536

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

// resolveUser resolves USER[:GROUP] (names or decimal ids) as container
// engines do: a name must be in passwd and gives its uid, primary gid and
// home; a number need not be (then gid 0, home /); GROUP, a name in group
// or a number, replaces the primary gid; the supplementary groups are
// those of group that list the user's name. A missing file counts as
// empty. Malformed lines are skipped, as the C library does.
func resolveUser(spec string, passwd, group func() (io.ReadCloser, error)) (*identity, error) {
	if err := initconfig.ValidUser(spec); err != nil {
		return nil, err
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	users, err := readAccounts(passwd, "/etc/passwd")
	if err != nil {
		return nil, err
	}
	id := &identity{home: "/"}
	var ent *passwdEntry
	if uid, numeric, _ := initconfig.ParseID(userPart); numeric {
		id.uid = uid
		ent = findPasswd(users, func(e *passwdEntry) bool { return e.uid == uid })
	} else {
		ent = findPasswd(users, func(e *passwdEntry) bool { return e.name == userPart })
		if ent == nil {
			return nil, fmt.Errorf("no user %q in the root's /etc/passwd", userPart)
		}
		id.uid = ent.uid
	}
	if ent != nil {
		id.gid = ent.gid
		if ent.home != "" {
			id.home = ent.home
		}
	}
	var groups [][]string
	if (hasGroup && !isNumeric(groupPart)) || ent != nil {
		if groups, err = readAccounts(group, "/etc/group"); err != nil {
			return nil, err
		}
	}
	if hasGroup {
		if gid, numeric, _ := initconfig.ParseID(groupPart); numeric {
			id.gid = gid
		} else {
			found := false
			for _, f := range groups {
				if f[0] == groupPart {
					if gid, ok := parseIDField(f[2]); ok {
						id.gid, found = gid, true
						break
					}
				}
			}
			if !found {
				return nil, fmt.Errorf("no group %q in the root's /etc/group", groupPart)
			}
		}
	}
	if ent != nil {
		for _, f := range groups {
			gid, ok := parseIDField(f[2])
			if !ok || gid == id.gid || slices.Contains(id.groups, gid) {
				continue
			}
			if slices.Contains(strings.Split(f[3], ","), ent.name) {
				if len(id.groups) == maxGroups {
					return nil, fmt.Errorf("user %q is in more than %d groups", ent.name, maxGroups)
				}
				id.groups = append(id.groups, gid)
			}
		}
	}
	return id, nil
}

func isNumeric(s string) bool {
	_, numeric, _ := initconfig.ParseID(s)
	return numeric
}

// parseIDField parses an id field of passwd or group.
func parseIDField(s string) (uint32, bool) {
	id, numeric, err := initconfig.ParseID(s)
	return id, numeric && err == nil
}

func findPasswd(lines [][]string, match func(*passwdEntry) bool) *passwdEntry {
	for _, f := range lines {
		if len(f) < 6 {
			continue
		}
		uid, ok1 := parseIDField(f[2])
		gid, ok2 := parseIDField(f[3])
		if !ok1 || !ok2 || f[0] == "" {
			continue
		}
		e := &passwdEntry{name: f[0], uid: uid, gid: gid, home: f[5]}
		if match(e) {
			return e
		}
	}
	return nil
}

// readAccounts reads a colon-separated account file into the fields of
// its lines that have at least four (comments, blank lines and NIS "+"
// and "-" lines skipped). A file that does not exist reads as empty; one
// over maxAccountFile is an error.
func readAccounts(open func() (io.ReadCloser, error), name string) ([][]string, error) {
	r, err := open()
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the root's %s: %w", name, err)
	}
	defer r.Close()
	b, err := io.ReadAll(io.LimitReader(r, maxAccountFile+1))
	if err != nil {
		return nil, fmt.Errorf("read the root's %s: %w", name, err)
	}
	if len(b) > maxAccountFile {
		return nil, fmt.Errorf("the root's %s is larger than %d bytes", name, maxAccountFile)
	}
	var out [][]string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), maxAccountFile)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' || line[0] == '+' || line[0] == '-' {
			continue
		}
		f := strings.Split(line, ":")
		if len(f) < 4 {
			continue
		}
		out = append(out, f)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read the root's %s: %w", name, err)
	}
	return out, nil
}

// openFile opens name for resolveUser, refusing anything but a regular
// file (a FIFO would block PID 1).
func openFile(name string) func() (io.ReadCloser, error) {
	return func() (io.ReadCloser, error) {
		f, err := os.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		if !st.Mode().IsRegular() {
			f.Close()
			return nil, fmt.Errorf("%s is not a regular file", name)
		}
		return f, nil
	}
}
