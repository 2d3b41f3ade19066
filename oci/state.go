package oci

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Files in a container's state directory (<root>/<id>/).
const (
	recordFile  = "state.json" // Record
	planFile    = "plan.json"  // Plan, written by create, read by the monitor
	monitorSock = "m"          // the monitor's control socket
	// exitedFile is made by the monitor once the command has exited: the
	// container is stopped from then on, even while the monitor tears the
	// VM down too busy to answer (a status that fell back to the record
	// said running, and a kill of the stopped container succeeded).
	exitedFile = "exited"
	// markerFile marks a state directory as krun-oci's. Create puts it
	// in before the directory takes its ID's name, so a directory without
	// a record counts as a create that died only when it holds the
	// marker: a wrong --root (a home directory) never makes a user's
	// directory look like a container that delete removes.
	markerFile = ".krun-oci"
)

// newPrefix names a state directory being made (Create), followed by the
// creating process's pid and a random part: not a valid ID ('~'), so
// nothing lists or opens it.
const newPrefix = "~new-"

// maxIDLen bounds a container ID (it becomes a directory name).
const maxIDLen = 255

// ErrNotExist says there is no container with that ID.
var ErrNotExist = errors.New("container does not exist")

// ErrExist says a container with that ID exists already.
var ErrExist = errors.New("container already exists")

// ErrCorrupt says a container's state file cannot be read as its record
// (a disk-backed --root after a crash can leave it empty): only delete
// --force removes such a container.
var ErrCorrupt = errors.New("corrupt")

// Phases recorded in the state file; the status reported is derived from
// the phase and whether the monitor is alive (Container.Status).
const (
	phaseCreating = "creating" // create runs; the monitor may not exist yet
	phaseCreated  = "created"  // the guest is booted and waits for start
	phaseStarted  = "started"  // start released the command
)

// Record is a container's state file: what survives the runtime process.
type Record struct {
	ID          string            `json:"id"`
	Bundle      string            `json:"bundle"`
	Rootfs      string            `json:"rootfs"`
	Created     time.Time         `json:"created"`
	Owner       string            `json:"owner"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Phase       string            `json:"phase"`
	// Pid is the monitor, the process that owns the VM: the container's
	// pid. PidStart is its start time in clock ticks since boot
	// (/proc/PID/stat field 22), so a reused pid is never taken for it.
	Pid      int    `json:"pid"`
	PidStart uint64 `json:"pid_start"`
	// Cgroup is the cgroup directory the monitor was placed in ("" for
	// none); delete removes it.
	Cgroup string `json:"cgroup,omitempty"`
}

// Store is the state root (--root): one directory per container.
type Store struct {
	Root string
}

// ValidID checks a container ID: 1-255 bytes of letters, digits and
// "_+-.", not "." or "..".
func ValidID(id string) error {
	if id == "" {
		return errors.New("container ID cannot be empty")
	}
	if len(id) > maxIDLen || id == "." || id == ".." {
		return fmt.Errorf("invalid container ID %q", id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '+' || c == '-' || c == '.') {
			return fmt.Errorf("invalid container ID %q: only letters, digits and _+-. are allowed", id)
		}
	}
	return nil
}

// Container is one container's state directory, locked while held.
type Container struct {
	ID  string
	Dir string
	Rec Record

	lock *os.File // the directory itself, flocked
	// dirDev and dirIno are the directory's as Read found it: a later
	// create of the same ID makes another.
	dirDev, dirIno uint64
}

// init makes the state root (mode 0700: it holds control sockets).
func (s *Store) init() error {
	if err := os.MkdirAll(s.Root, 0o700); err != nil {
		return fmt.Errorf("state root %s: %w", s.Root, err)
	}
	return nil
}

// Create makes the state directory of a new container and returns it
// locked. It fails with ErrExist when the ID is taken.
func (s *Store) Create(id string) (*Container, error) {
	if err := ValidID(id); err != nil {
		return nil, err
	}
	if err := s.init(); err != nil {
		return nil, err
	}
	if err := s.checkFree(id); err != nil {
		return nil, err
	}
	dir := filepath.Join(s.Root, id)
	// Made under another name with its marker, then renamed into place
	// without replacing anything: the directory never has its ID's name
	// without the marker.
	// The temporary name does not hold the ID: an ID may be as long as
	// a file name can be (255 bytes), with no room for a suffix.
	s.sweepNew()
	tmp, err := os.MkdirTemp(s.Root, newPrefix+strconv.Itoa(os.Getpid())+"-")
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	fail := func(err error) (*Container, error) {
		os.RemoveAll(tmp)
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(tmp, markerFile), nil, 0o600); err != nil {
		return fail(fmt.Errorf("state directory: %w", err))
	}
	// Locked before it takes its name (the lock goes with the
	// directory), so no delete can take it between the rename and the
	// lock.
	f, err := os.OpenFile(tmp, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return fail(fmt.Errorf("state directory: %w", err))
	}
	if err := flockRetry(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return fail(fmt.Errorf("lock state directory: %w", err))
	}
	err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, dir, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) {
		// A file system without RENAME_NOREPLACE (NFS, some FUSE): a
		// plain rename, which replaces no directory that holds
		// anything, and the check above saw no entry of that name.
		err = os.Rename(tmp, dir)
	}
	if err != nil {
		f.Close()
		if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.ENOTEMPTY) {
			return fail(fmt.Errorf("container with id %s: %w", id, ErrExist))
		}
		return fail(fmt.Errorf("state directory: %w", err))
	}
	return &Container{ID: id, Dir: dir, lock: f}, nil
}

// checkFree fails with ErrExist when id's name is taken under the root.
func (s *Store) checkFree(id string) error {
	if _, err := os.Lstat(filepath.Join(s.Root, id)); err == nil {
		return fmt.Errorf("container with id %s: %w", id, ErrExist)
	}
	return nil
}

// sweepNew removes what creates that died left under their temporary names
// (newPrefix, the pid, a random suffix): only those of processes that no
// longer exist, so a create under way keeps its own.
func (s *Store) sweepNew() {
	ents, err := os.ReadDir(s.Root)
	if err != nil {
		return
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), newPrefix)
		if !ok || !e.IsDir() {
			continue
		}
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid <= 0 {
			continue
		}
		if unix.Kill(pid, 0) == unix.ESRCH {
			os.RemoveAll(filepath.Join(s.Root, e.Name()))
		}
	}
}

// Open locks an existing container's state directory and reads its
// record. Commands on one ID are serialized by this lock.
func (s *Store) Open(id string) (*Container, error) {
	c, unreadable, err := s.openUnreadable(id)
	if err == nil && unreadable != nil {
		c.Unlock()
		return nil, unreadable
	}
	return c, err
}

// openUnreadable is Open for delete --force: a container whose state
// file is corrupt is returned locked too, with the reason in unreadable.
func (s *Store) openUnreadable(id string) (c *Container, unreadable error, err error) {
	if err := ValidID(id); err != nil {
		return nil, nil, err
	}
	c, err = lockDir(id, filepath.Join(s.Root, id))
	if err != nil {
		return nil, nil, err
	}
	if err := c.load(); err != nil {
		if errors.Is(err, ErrCorrupt) {
			return c, err, nil
		}
		c.Unlock()
		return nil, nil, err
	}
	return c, nil, nil
}

// Read reads a container's record without taking its lock (state and
// list must answer while a create holds it).
func (s *Store) Read(id string) (*Container, error) {
	if err := ValidID(id); err != nil {
		return nil, err
	}
	dir := filepath.Join(s.Root, id)
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, fmt.Errorf("container %s: %w", id, ErrNotExist)
	}
	c := &Container{ID: id, Dir: dir, dirDev: st.Dev, dirIno: st.Ino}
	if err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

// busy reports whether another command holds the container's lock.
func (c *Container) busy() bool {
	if c.lock != nil {
		return false
	}
	fd, err := unix.Open(c.Dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) == unix.EWOULDBLOCK
}

// List returns the IDs of the containers under the root.
func (s *Store) List() ([]string, error) {
	ents, err := os.ReadDir(s.Root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state root %s: %w", s.Root, err)
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && ValidID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

func lockDir(id, dir string) (*Container, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("container %s: %w", id, ErrNotExist)
		}
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := flockRetry(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	// A delete that held the lock before us has removed the directory
	// (its inode has no links left), or moved it away to remove it.
	var st, now unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Nlink == 0 ||
		unix.Lstat(dir, &now) != nil || now.Dev != st.Dev || now.Ino != st.Ino {
		f.Close()
		return nil, fmt.Errorf("container %s: %w", id, ErrNotExist)
	}
	return &Container{ID: id, Dir: dir, lock: f}, nil
}

func flockRetry(fd, how int) error {
	for {
		err := unix.Flock(fd, how)
		if err != unix.EINTR {
			return err
		}
	}
}

// Unlock releases the lock (the state stays).
func (c *Container) Unlock() {
	if c.lock != nil {
		c.lock.Close()
		c.lock = nil
	}
}

func (c *Container) load() error {
	b, err := os.ReadFile(filepath.Join(c.Dir, recordFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			if !c.marked() {
				return c.notOurs()
			}
			// A create that died before writing its record: the
			// container exists (its ID is taken) and has stopped.
			c.Rec = Record{ID: c.ID, Phase: phaseCreating}
			return nil
		}
		return fmt.Errorf("read state: %w", err)
	}
	if err := json.Unmarshal(b, &c.Rec); err != nil {
		if !c.marked() {
			return c.notOurs()
		}
		return fmt.Errorf("state file of %s is %w (delete --force removes the container): %w", c.ID, ErrCorrupt, err)
	}
	if c.Rec.ID != c.ID {
		if !c.marked() {
			return c.notOurs()
		}
		return fmt.Errorf("state file of %s is %w (delete --force removes the container): it names container %q", c.ID, ErrCorrupt, c.Rec.ID)
	}
	return nil
}

// marked reports whether the state directory holds krun-oci's marker.
func (c *Container) marked() bool {
	var st unix.Stat_t
	return unix.Lstat(filepath.Join(c.Dir, markerFile), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG
}

// notOurs is load's error for a directory under the root that krun-oci
// did not make (no marker, no readable record of its ID): no container,
// and nothing that delete removes.
func (c *Container) notOurs() error {
	return fmt.Errorf("container %s: %w (%s is not a krun-oci state directory: wrong --root?)", c.ID, ErrNotExist, c.Dir)
}

// Save writes the record atomically.
func (c *Container) Save() error {
	b, err := json.MarshalIndent(&c.Rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	return writeFileAtomic(filepath.Join(c.Dir, recordFile), b, 0o600)
}

// removedSuffix names a state directory on its way out: not a valid ID, so
// nothing lists or opens it.
const removedSuffix = "~deleted"

// Remove deletes the state directory; the lock is released. The directory
// is first renamed out of the way, so that a state or list meanwhile finds
// the container or nothing, never a directory half removed (its record
// gone: "creating", pid 0), also when the removal fails or is cut short
// (found in review, helper-100).
func (c *Container) Remove() error {
	dir := c.Dir
	gone := c.Dir + removedSuffix
	_ = os.RemoveAll(gone) // what a delete that died left
	if err := os.Rename(c.Dir, gone); err == nil {
		dir = gone
	}
	err := os.RemoveAll(dir)
	c.Unlock()
	if err != nil {
		return fmt.Errorf("remove state: %w", err)
	}
	return nil
}

// holdsPlan reports whether the container's directory, under its ID's
// name, still holds the plan (a removal that failed before it).
func (c *Container) holdsPlan() bool {
	_, err := os.Lstat(filepath.Join(c.Dir, planFile))
	return err == nil
}

// writeFileAtomic writes path through a new temporary file in its
// directory, renamed over it: a reader never sees a partial file. The
// temporary file is made with O_EXCL under a name of its own: one of a
// fixed name (path+".tmp"), opened with O_TRUNC, followed a symbolic link
// planted there, and a pid file's directory that someone else can write
// made the runtime overwrite any host file with the pid (found in review;
// runc's is O_EXCL too).
func writeFileAtomic(path string, b []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	// CreateTemp makes it 0600: the mode asked for (the umask is not
	// read: changing it to read it races the process's other threads).
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(b)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// MonitorAlive reports whether the recorded monitor process still runs
// (a zombie has ended: it only waits for its parent to collect it).
func (c *Container) MonitorAlive() bool {
	return c.Rec.Pid > 0 && processAlive(c.Rec.Pid, c.Rec.PidStart)
}

// processAlive reports whether pid runs and started at start (clock
// ticks since boot; 0 skips that check).
func processAlive(pid int, start uint64) bool {
	st, state, err := procStat(pid)
	if err != nil {
		return false
	}
	if state == 'Z' || state == 'X' {
		return false
	}
	return start == 0 || st == start
}

// procStat returns a process's start time and state letter from
// /proc/PID/stat.
func procStat(pid int) (start uint64, state byte, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// The command name is in parentheses and may contain anything: the
	// fields follow the last ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, 0, errors.New("malformed /proc stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); field 22 (starttime) is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, errors.New("malformed /proc stat")
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("malformed /proc stat: %w", err)
	}
	return start, f[0][0], nil
}

// ociState is the state JSON the spec defines, with the fields runc adds
// that podman and containerd read (rootfs, created, owner).
type ociState struct {
	specs.State
	Rootfs  string    `json:"rootfs"`
	Created time.Time `json:"created"`
	Owner   string    `json:"owner"`
}
