package pluginhost

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// A plugin's private socket directory (go-plugin makes its own directory,
// and the plugin its gRPC socket, inside it) lives in krun.UID, a
// directory of this user's under the base ($TMPDIR), and is removed once
// the host is connected. A host killed (SIGKILL, the OOM killer) while its
// plugin starts cannot remove it, so each launch removes those a killed
// host left there (found in review): they are recognised by where they
// are, by their name, by an flock no one holds (a live host holds its
// own, in whatever pid namespace), by their age and by holding nothing
// but go-plugin's directories and sockets. Nothing outside krun.UID is
// ever removed.

// staleSockDirAge is how old an unlocked socket directory must be before
// a launch takes it for a killed host's: a directory is locked within
// microseconds of being made.
const staleSockDirAge = 30 * time.Second

// newSockDir makes a private socket directory for a plugin of kind under
// base (os.TempDir() if ""), and returns it with the file that holds its
// lock (nil if it could not be locked: a sweep then takes it for stale
// once it is older than staleSockDirAge, long after it was needed).
func newSockDir(base, kind string, log hclog.Logger) (string, *os.File, error) {
	if base == "" {
		base = os.TempDir()
	}
	parent, prefix := base, "krun-"+kind+"-"
	if p, ok := sockParent(base); ok {
		sweepSockDirs(p, log)
		parent, prefix = p, kind+"-"
	}
	dir, err := mkdirSockDir(parent, prefix)
	if err != nil {
		return "", nil, err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		os.Remove(dir)
		return "", nil, err
	}
	lock, err := lockSockDir(dir)
	if err != nil {
		log.Debug("plugin socket directory not locked", "dir", dir, "error", err)
	}
	return dir, lock, nil
}

// sockDirDigits is the width of a socket directory's random suffix: a
// fixed width, so that whether its path fits a unix socket address
// (StartProcess) depends on $TMPDIR, not on the draw (os.MkdirTemp's
// suffix has 1 to 10 digits: a $TMPDIR near the limit failed about every
// other start; found in review, helper-143).
const sockDirDigits = 10

// mkdirSockDir makes parent/prefix followed by sockDirDigits random digits,
// mode 0700.
func mkdirSockDir(parent, prefix string) (string, error) {
	var err error
	for range 100 {
		dir := filepath.Join(parent, fmt.Sprintf("%s%0*d", prefix, sockDirDigits, rand.Uint32()))
		if err = os.Mkdir(dir, 0o700); !errors.Is(err, fs.ErrExist) {
			return dir, err
		}
	}
	return "", err
}

// sockParent returns base/krun.UID, made if missing, when it is a
// directory of this user's that no one else may enter (not a link another
// user planted in a shared /tmp); false otherwise, and the socket
// directories are then made in base itself, and never swept.
func sockParent(base string) (string, bool) {
	uid := os.Geteuid()
	p := filepath.Join(base, fmt.Sprintf("krun.%d", uid))
	if err := unix.Mkdir(p, 0o700); err != nil && err != unix.EEXIST {
		return "", false
	}
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR ||
		st.Uid != uint32(uid) || st.Mode&0o077 != 0 {
		return "", false
	}
	return p, true
}

// lockSockDir opens the socket directory and takes an exclusive flock on
// it, held as long as the file stays open (not inherited: close-on-exec).
func lockSockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return f, nil
}

// sweepSockDirs removes from parent (krun.UID) the socket directories a
// killed host left.
func sweepSockDirs(parent string, log hclog.Logger) {
	ents, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		if !e.IsDir() || !isSockDirName(name) {
			continue
		}
		dir := filepath.Join(parent, name)
		var st unix.Stat_t
		if unix.Lstat(dir, &st) != nil || st.Uid != uint32(os.Geteuid()) ||
			time.Since(time.Unix(st.Mtim.Unix())) < staleSockDirAge {
			continue
		}
		f, err := lockSockDir(dir)
		if err != nil {
			continue // in use, or not ours to open
		}
		if !onlyPluginSockets(dir) {
			log.Debug("left in place: not only a plugin's sockets", "dir", dir)
		} else if err := os.RemoveAll(dir); err != nil {
			log.Debug("removing a killed host's plugin socket directory", "dir", dir, "error", err)
		} else {
			log.Debug("removed a killed host's plugin socket directory", "dir", dir)
		}
		f.Close()
	}
}

// isSockDirName tells whether name is one newSockDir makes in krun.UID:
// KIND "-" digits (of any width: older versions made them with
// os.MkdirTemp).
func isSockDirName(name string) bool {
	i := strings.LastIndexByte(name, '-')
	if i < 0 || CheckKind(name[:i]) != nil || i+1 == len(name) {
		return false
	}
	for _, c := range name[i+1:] {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// onlyPluginSockets tells whether dir holds nothing but what go-plugin and
// a plugin put there: directories named plugin-dir* holding sockets.
func onlyPluginSockets(dir string) bool {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "plugin-dir") {
			return false
		}
		inner, err := os.ReadDir(filepath.Join(dir, e.Name()))
		if err != nil {
			return false
		}
		for _, s := range inner {
			if s.Type()&os.ModeSocket == 0 {
				return false
			}
		}
	}
	return true
}
