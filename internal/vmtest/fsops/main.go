// Command fsops is a guest-side tool of the end-to-end tests: single file
// system calls that busybox does not offer (extended attributes, mmap,
// flock and POSIX locks, renameat2 flags, SEEK_DATA/SEEK_HOLE, O_TMPFILE,
// directory offsets, copy_file_range), each printing one line, so that a
// guest script can compare two virtio-fs servers.
//
//	fsops OP ARGS...
//
// It prints what the call returned ("ok", a value) or the errno's text and
// exits 0, or 1 when the call failed; 2 for a bad command line.
package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: fsops OP ARGS...")
		os.Exit(2)
	}
	out, err := run(os.Args[1], os.Args[2:])
	if err != nil {
		var errno unix.Errno
		if errors.As(err, &errno) {
			fmt.Println("error:", errno.Error())
		} else {
			fmt.Println("error:", err)
		}
		os.Exit(1)
	}
	fmt.Println(out)
}

func need(args []string, n int) error {
	if len(args) != n {
		return fmt.Errorf("want %d arguments, got %d", n, len(args))
	}
	return nil
}

func num(s string) int64 {
	n, err := strconv.ParseInt(s, 0, 64)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fsops: bad number %q\n", s)
		os.Exit(2)
	}
	return n
}

func run(op string, a []string) (string, error) {
	switch op {
	case "setxattr", "lsetxattr": // FILE NAME VALUE
		if err := need(a, 3); err != nil {
			return "", err
		}
		set := unix.Setxattr
		if op == "lsetxattr" {
			set = unix.Lsetxattr
		}
		return "ok", set(a[0], a[1], []byte(a[2]), 0)
	case "setxattr-create", "setxattr-replace": // FILE NAME VALUE
		if err := need(a, 3); err != nil {
			return "", err
		}
		flag := unix.XATTR_CREATE
		if op == "setxattr-replace" {
			flag = unix.XATTR_REPLACE
		}
		return "ok", unix.Setxattr(a[0], a[1], []byte(a[2]), flag)
	case "getxattr", "lgetxattr": // FILE NAME
		if err := need(a, 2); err != nil {
			return "", err
		}
		get := unix.Getxattr
		if op == "lgetxattr" {
			get = unix.Lgetxattr
		}
		n, err := get(a[0], a[1], nil)
		if err != nil {
			return "", err
		}
		buf := make([]byte, n)
		n, err = get(a[0], a[1], buf)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%q", buf[:n]), nil
	case "getxattr-small": // FILE NAME: a buffer of 1 byte
		if err := need(a, 2); err != nil {
			return "", err
		}
		_, err := unix.Getxattr(a[0], a[1], make([]byte, 1))
		return "ok", err
	case "listxattr", "llistxattr": // FILE: the user.* names, sorted
		if err := need(a, 1); err != nil {
			return "", err
		}
		list := unix.Listxattr
		if op == "llistxattr" {
			list = unix.Llistxattr
		}
		n, err := list(a[0], nil)
		if err != nil {
			return "", err
		}
		buf := make([]byte, n)
		n, err = list(a[0], buf)
		if err != nil {
			return "", err
		}
		var names []string
		for _, s := range bytes.Split(buf[:n], []byte{0}) {
			if strings.HasPrefix(string(s), "user.") {
				names = append(names, string(s))
			}
		}
		sort.Strings(names)
		return "[" + strings.Join(names, " ") + "]", nil
	case "removexattr": // FILE NAME
		if err := need(a, 2); err != nil {
			return "", err
		}
		return "ok", unix.Removexattr(a[0], a[1])
	case "mmap-write": // FILE OFF TEXT: a shared mapping of the file, msync
		if err := need(a, 3); err != nil {
			return "", err
		}
		return mmapWrite(a[0], num(a[1]), a[2])
	case "mmap-read": // FILE OFF N: through a shared read-only mapping
		if err := need(a, 3); err != nil {
			return "", err
		}
		return mmapRead(a[0], num(a[1]), num(a[2]))
	case "flock": // FILE: LOCK_EX on one open file, LOCK_EX|LOCK_NB on another
		if err := need(a, 1); err != nil {
			return "", err
		}
		return lockTwice(a[0], func(fd int, second bool) error {
			how := unix.LOCK_EX
			if second {
				how |= unix.LOCK_NB
			}
			return unix.Flock(fd, how)
		})
	case "posixlock": // FILE: F_SETLK write lock, then F_GETLK from a child process
		if err := need(a, 1); err != nil {
			return "", err
		}
		return posixLock(a[0])
	case "getlk": // FILE: F_GETLK for a whole-file write lock (run by posixlock)
		if err := need(a, 1); err != nil {
			return "", err
		}
		fd, err := unix.Open(a[0], unix.O_RDWR, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0}
		if err := unix.FcntlFlock(uintptr(fd), unix.F_GETLK, &lk); err != nil {
			return "", err
		}
		return fmt.Sprintf("type %d", lk.Type), nil
	case "rename-noreplace", "rename-exchange": // OLD NEW
		if err := need(a, 2); err != nil {
			return "", err
		}
		flag := uint(unix.RENAME_NOREPLACE)
		if op == "rename-exchange" {
			flag = unix.RENAME_EXCHANGE
		}
		return "ok", unix.Renameat2(unix.AT_FDCWD, a[0], unix.AT_FDCWD, a[1], flag)
	case "seek": // FILE data|hole OFF
		if err := need(a, 3); err != nil {
			return "", err
		}
		fd, err := unix.Open(a[0], unix.O_RDONLY, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		whence := unix.SEEK_DATA
		if a[1] == "hole" {
			whence = unix.SEEK_HOLE
		}
		off, err := unix.Seek(fd, num(a[2]), whence)
		return strconv.FormatInt(off, 10), err
	case "tmpfile": // DIR: an O_TMPFILE file, written to
		if err := need(a, 1); err != nil {
			return "", err
		}
		fd, err := unix.Open(a[0], unix.O_TMPFILE|unix.O_RDWR, 0o600)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		if _, err := unix.Write(fd, []byte("tmp")); err != nil {
			return "", fmt.Errorf("write: %w", err)
		}
		return "ok", nil
	case "open": // FILE FLAGS...: excl, creat, nofollow, directory, rdonly, wronly, rdwr, trunc, append
		if len(a) < 1 {
			return "", errors.New("want FILE FLAGS...")
		}
		flags := 0
		for _, f := range a[1:] {
			v, ok := map[string]int{"excl": unix.O_EXCL, "creat": unix.O_CREAT, "nofollow": unix.O_NOFOLLOW,
				"directory": unix.O_DIRECTORY, "rdonly": unix.O_RDONLY, "wronly": unix.O_WRONLY, "rdwr": unix.O_RDWR,
				"trunc": unix.O_TRUNC, "append": unix.O_APPEND, "path": unix.O_PATH}[f]
			if !ok {
				return "", fmt.Errorf("unknown flag %q", f)
			}
			flags |= v
		}
		fd, err := unix.Open(a[0], flags, 0o644)
		if err != nil {
			return "", err
		}
		unix.Close(fd)
		return "ok", nil
	case "pwrite": // FILE OFF TEXT
		if err := need(a, 3); err != nil {
			return "", err
		}
		fd, err := unix.Open(a[0], unix.O_WRONLY, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		n, err := unix.Pwrite(fd, []byte(a[2]), num(a[1]))
		return strconv.Itoa(n), err
	case "append-pwrite": // FILE OFF TEXT: pwrite on an O_APPEND fd appends
		if err := need(a, 3); err != nil {
			return "", err
		}
		fd, err := unix.Open(a[0], unix.O_WRONLY|unix.O_APPEND, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		n, err := unix.Pwrite(fd, []byte(a[2]), num(a[1]))
		return strconv.Itoa(n), err
	case "readdir-resume": // DIR STRIDE: list, then lseek to every STRIDE-th entry's d_off and list the rest
		if err := need(a, 2); err != nil {
			return "", err
		}
		return readdirResume(a[0], int(num(a[1])))
	case "mmap-append": // FILE OFF TEXT: a shared writable mapping of an O_APPEND fd
		if err := need(a, 3); err != nil {
			return "", err
		}
		return mmapAppend(a[0], num(a[1]), a[2])
	case "copy-range": // SRC DST: copy_file_range of the whole file
		if err := need(a, 2); err != nil {
			return "", err
		}
		in, err := unix.Open(a[0], unix.O_RDONLY, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(in)
		out, err := unix.Open(a[1], unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC, 0o644)
		if err != nil {
			return "", err
		}
		defer unix.Close(out)
		total := 0
		for {
			n, err := unix.CopyFileRange(in, nil, out, nil, 1<<20, 0)
			if err != nil {
				return "", err
			}
			if n == 0 {
				return strconv.Itoa(total), nil
			}
			total += n
		}
	case "fsync", "fdatasync", "syncfs": // FILE
		if err := need(a, 1); err != nil {
			return "", err
		}
		fd, err := unix.Open(a[0], unix.O_RDONLY, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		switch op {
		case "fsync":
			err = unix.Fsync(fd)
		case "fdatasync":
			err = unix.Fdatasync(fd)
		default:
			err = unix.Syncfs(fd)
		}
		return "ok", err
	case "utimens": // FILE ATIME-NS MTIME-NS (now, omit or nanoseconds)
		if err := need(a, 3); err != nil {
			return "", err
		}
		ts := func(s string) unix.Timespec {
			switch s {
			case "now":
				return unix.Timespec{Nsec: unix.UTIME_NOW}
			case "omit":
				return unix.Timespec{Nsec: unix.UTIME_OMIT}
			}
			return unix.NsecToTimespec(num(s))
		}
		return "ok", unix.UtimesNanoAt(unix.AT_FDCWD, a[0], []unix.Timespec{ts(a[1]), ts(a[2])}, unix.AT_SYMLINK_NOFOLLOW)
	case "rename": // OLD NEW: plain rename(2), no same-file check
		if err := need(a, 2); err != nil {
			return "", err
		}
		return "ok", unix.Rename(a[0], a[1])
	case "setcap": // FILE: a valid security.capability (CAP_NET_RAW permitted)
		if err := need(a, 1); err != nil {
			return "", err
		}
		v := make([]byte, 20)
		binary.LittleEndian.PutUint32(v[0:], 0x02000000) // VFS_CAP_REVISION_2
		binary.LittleEndian.PutUint32(v[4:], 1<<unix.CAP_NET_RAW)
		return "ok", unix.Setxattr(a[0], "security.capability", v, 0)
	case "unlinked": // FILE: calls on an open file after its last name is gone
		if err := need(a, 1); err != nil {
			return "", err
		}
		return unlinked(a[0])
	case "fallocate": // FILE MODE OFF LEN: MODE is a sum of punch, keep, zero, collapse, insert, unshare
		if err := need(a, 4); err != nil {
			return "", err
		}
		mode := uint32(0)
		for _, m := range strings.Split(a[1], "+") {
			v, ok := map[string]uint32{"0": 0, "keep": unix.FALLOC_FL_KEEP_SIZE, "punch": unix.FALLOC_FL_PUNCH_HOLE,
				"zero": unix.FALLOC_FL_ZERO_RANGE, "collapse": unix.FALLOC_FL_COLLAPSE_RANGE,
				"insert": unix.FALLOC_FL_INSERT_RANGE, "unshare": unix.FALLOC_FL_UNSHARE_RANGE}[m]
			if !ok {
				return "", fmt.Errorf("unknown fallocate mode %q", m)
			}
			mode |= v
		}
		fd, err := unix.Open(a[0], unix.O_RDWR, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		return "ok", unix.Fallocate(fd, mode, num(a[2]), num(a[3]))
	case "mksock": // PATH: a unix socket bound at PATH
		if err := need(a, 1); err != nil {
			return "", err
		}
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		return "ok", unix.Bind(fd, &unix.SockaddrUnix{Name: a[0]})
	case "mtime-ns": // FILE
		if err := need(a, 1); err != nil {
			return "", err
		}
		var st unix.Stat_t
		if err := unix.Lstat(a[0], &st); err != nil {
			return "", err
		}
		return fmt.Sprintf("%d %d", st.Atim.Nano(), st.Mtim.Nano()), nil
	}
	return "", fmt.Errorf("unknown operation %q", op)
}

func unlinked(name string) (string, error) {
	fd, err := unix.Open(name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL, 0o644)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	if err := unix.Unlink(name); err != nil {
		return "", fmt.Errorf("unlink: %w", err)
	}
	var res []string
	step := func(what string, err error) {
		var errno unix.Errno
		switch {
		case err == nil:
			res = append(res, what+" ok")
		case errors.As(err, &errno):
			res = append(res, what+" "+errno.Error())
		default:
			res = append(res, what+" "+err.Error())
		}
	}
	_, err = unix.Write(fd, []byte("hello"))
	step("write", err)
	step("ftruncate", unix.Ftruncate(fd, 3))
	step("fchmod", unix.Fchmod(fd, 0o600))
	step("fchown", unix.Fchown(fd, 0, 0))
	step("fsetxattr", unix.Fsetxattr(fd, "user.u", []byte("x"), 0))
	n, err := unix.Fgetxattr(fd, "user.u", make([]byte, 16))
	step(fmt.Sprintf("fgetxattr(%d)", n), err)
	n, err = unix.Flistxattr(fd, make([]byte, 256))
	step(fmt.Sprintf("flistxattr(%d)", n), err)
	step("fremovexattr", unix.Fremovexattr(fd, "user.u"))
	step("futimens", unix.UtimesNanoAt(fd, "", []unix.Timespec{{Sec: 1}, {Sec: 2}}, unix.AT_EMPTY_PATH))
	step("fallocate", unix.Fallocate(fd, 0, 0, 8192))
	step("fsync", unix.Fsync(fd))
	buf := make([]byte, 8)
	n, err = unix.Pread(fd, buf, 0)
	step(fmt.Sprintf("pread %q", buf[:max(n, 0)]), err)
	var st unix.Stat_t
	err = unix.Fstat(fd, &st)
	step(fmt.Sprintf("fstat size %d mode %o nlink %d", st.Size, st.Mode&0o7777, st.Nlink), err)
	return strings.Join(res, "; "), nil
}

func mmapWrite(name string, off int64, text string) (string, error) {
	fd, err := unix.Open(name, unix.O_RDWR, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	m, err := unix.Mmap(fd, 0, int(off)+len(text), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return "", fmt.Errorf("mmap: %w", err)
	}
	copy(m[off:], text)
	if err := unix.Msync(m, unix.MS_SYNC); err != nil {
		unix.Munmap(m)
		return "", fmt.Errorf("msync: %w", err)
	}
	return "ok", unix.Munmap(m)
}

func mmapAppend(name string, off int64, text string) (string, error) {
	fd, err := unix.Open(name, unix.O_RDWR|unix.O_APPEND, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	m, err := unix.Mmap(fd, 0, int(off)+len(text), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return "", fmt.Errorf("mmap: %w", err)
	}
	copy(m[off:], text)
	if err := unix.Msync(m, unix.MS_SYNC); err != nil {
		unix.Munmap(m)
		return "", fmt.Errorf("msync: %w", err)
	}
	if err := unix.Munmap(m); err != nil {
		return "", err
	}
	if _, err := unix.Write(fd, []byte("+end")); err != nil {
		return "", fmt.Errorf("append: %w", err)
	}
	return "ok", unix.Fsync(fd)
}

func mmapRead(name string, off, n int64) (string, error) {
	fd, err := unix.Open(name, unix.O_RDONLY, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	m, err := unix.Mmap(fd, 0, int(off+n), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return "", fmt.Errorf("mmap: %w", err)
	}
	s := fmt.Sprintf("%q", m[off:off+n])
	return s, unix.Munmap(m)
}

func lockTwice(name string, lock func(fd int, second bool) error) (string, error) {
	fd1, err := unix.Open(name, unix.O_RDWR, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd1)
	fd2, err := unix.Open(name, unix.O_RDWR, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd2)
	if err := lock(fd1, false); err != nil {
		return "", fmt.Errorf("first lock: %w", err)
	}
	if err := lock(fd2, true); err != nil {
		var errno unix.Errno
		if errors.As(err, &errno) {
			return "second lock: " + errno.Error(), nil
		}
		return "", err
	}
	return "second lock: granted", nil
}

func posixLock(name string) (string, error) {
	fd, err := unix.Open(name, unix.O_RDWR, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_SETLK, &lk); err != nil {
		return "", fmt.Errorf("F_SETLK: %w", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	out, err := exec.Command(exe, "getlk", name).Output()
	if err != nil {
		return "", fmt.Errorf("getlk: %w", err)
	}
	return "F_SETLK ok, other process F_GETLK: " + strings.TrimSpace(string(out)), nil
}

func readdirResume(dir string, stride int) (string, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	type ent struct {
		name string
		off  int64
	}
	list := func() ([]ent, error) {
		var ents []ent
		buf := make([]byte, 512) // small: many READDIR round trips
		for {
			n, err := unix.Getdents(fd, buf)
			if err != nil {
				return nil, err
			}
			if n == 0 {
				return ents, nil
			}
			for b := buf[:n]; len(b) > 0; {
				reclen := int(uint16(b[16]) | uint16(b[17])<<8)
				off := int64(0)
				for i := 7; i >= 0; i-- {
					off = off<<8 | int64(b[8+i])
				}
				name := b[19:reclen]
				if i := bytes.IndexByte(name, 0); i >= 0 {
					name = name[:i]
				}
				ents = append(ents, ent{string(name), off})
				b = b[reclen:]
			}
		}
	}
	all, err := list()
	if err != nil {
		return "", err
	}
	bad := 0
	for i, e := range all {
		if stride > 1 && i%stride != 0 {
			continue
		}
		if _, err := unix.Seek(fd, e.off, 0); err != nil {
			return "", fmt.Errorf("seek to %d: %w", e.off, err)
		}
		rest, err := list()
		if err != nil {
			return "", fmt.Errorf("list after seek: %w", err)
		}
		if len(rest) != len(all)-i-1 {
			bad++
			continue
		}
		for k, r := range rest {
			if r.name != all[i+1+k].name {
				bad++
				break
			}
		}
	}
	return fmt.Sprintf("%d entries, %d resumed listings wrong", len(all), bad), nil
}
