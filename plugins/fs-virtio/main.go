// Command krun-plugin-fs-virtio serves a host directory as a virtio-fs
// device over vhost-user. The host opens the directory (file "dir") and
// hands it over; the plugin opens no other path, and inside its sandbox
// landlock lets it reach nothing but that directory.
//
// Options (see core/devspec and docs/VIRTIOFS.md):
//
//	tag=TAG          mount tag, 1 to 36 bytes (required)
//	readonly=on|off  refuse every modification with EROFS
//	uidmap=G:H:N[/G:H:N...], gidmap=...  guest<->host id ranges (default identity)
//	cache=SECONDS    entry and attribute timeout, 0 to 3600 (default 1)
//	xattr=on|off     extended attributes (default on)
//	workers=N        requests served at once per request queue (default 8)
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/devices/fs"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// Options besides devspec's tag and readonly.
const (
	optUIDMap  = "uidmap"
	optGIDMap  = "gidmap"
	optCache   = "cache"
	optXattr   = "xattr"
	optWorkers = "workers"
)

type plugin struct{}

func (plugin) Kind() string { return "fs-virtio" }

// Policy is the "fs" profile with read-write landlock access beneath the
// shared directory only.
func (plugin) Policy(fds map[string]int) sandbox.Policy {
	fd, ok := fds[devspec.FileDir]
	if !ok {
		return sandbox.Policy{Kind: "fs", Syscalls: sandbox.ProfileFS}
	}
	p, _ := sandbox.DefaultPolicy("fs", fd)
	return p
}

func (plugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	if err := pluginsdk.CheckOptions(opts, devspec.OptTag, devspec.OptReadOnly, optUIDMap, optGIDMap, optCache, optXattr, optWorkers); err != nil {
		return nil, err
	}
	dir := files[devspec.FileDir]
	if dir == nil {
		return nil, fmt.Errorf("no %q directory was passed", devspec.FileDir)
	}
	for name := range files {
		if name != devspec.FileDir {
			return nil, fmt.Errorf("unexpected file %q: the plugin takes only the shared directory", name)
		}
	}
	tag := opts[devspec.OptTag]
	if tag == "" {
		return nil, fmt.Errorf("option tag= is required")
	}
	ro, err := pluginsdk.OnOff(opts, devspec.OptReadOnly, false)
	if err != nil {
		return nil, err
	}
	xattr, err := pluginsdk.OnOff(opts, optXattr, true)
	if err != nil {
		return nil, err
	}
	uids, err := fs.ParseIDMaps(opts[optUIDMap])
	if err != nil {
		return nil, fmt.Errorf("option %s: %w", optUIDMap, err)
	}
	gids, err := fs.ParseIDMaps(opts[optGIDMap])
	if err != nil {
		return nil, fmt.Errorf("option %s: %w", optGIDMap, err)
	}
	timeout := time.Duration(0)
	if v, ok := opts[optCache]; ok {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n > 3600 {
			return nil, fmt.Errorf("option %s=%q: want seconds from 0 to 3600", optCache, v)
		}
		timeout = time.Duration(n) * time.Second
		if n == 0 {
			timeout = -1
		}
	}
	workers := 0
	if v, ok := opts[optWorkers]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 256 {
			return nil, fmt.Errorf("option %s=%q: want 1..256", optWorkers, v)
		}
		workers = n
	}
	dev, err := fs.New(fs.Config{
		ServerConfig: fs.ServerConfig{
			Dir: dir, ReadOnly: ro, UIDMap: uids, GIDMap: gids,
			EntryTimeout: timeout, AttrTimeout: timeout, NoXattr: !xattr, Log: log,
		},
		Tag:     tag,
		Workers: workers,
	})
	// The server keeps its own fd of the directory.
	dir.Close()
	if err != nil {
		return nil, err
	}
	log.Info("serving directory", "tag", tag, "readonly", ro, "xattr", xattr)
	return dev, nil
}

func main() {
	// Modes the guest asks for are already masked by the guest kernel's
	// umask; the host's must not mask them again.
	unix.Umask(0)
	raiseNoFile()
	pluginsdk.Serve(plugin{})
}

// raiseNoFile lifts the soft open-file limit to the hard one: every inode
// the guest holds is an O_PATH fd.
func raiseNoFile() {
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		unix.Setrlimit(unix.RLIMIT_NOFILE, &rl)
	}
}
