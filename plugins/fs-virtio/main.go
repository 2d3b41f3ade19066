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
//	suid=on|off      let the guest set set-user-ID/set-group-ID bits and file
//	                 capabilities on host files (default off: the share is nosuid)
package main

import (
	"context"
	"fmt"
	"os"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/sandbox"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

type plugin struct{}

func (plugin) Kind() string { return devopts.KindFS }

// Policy is the "fs" profile with read-write landlock access beneath the
// shared directory only.
func (plugin) Policy(fds map[string]int) sandbox.Policy {
	fd, ok := fds[devopts.FileDir]
	if !ok {
		return sandbox.Policy{Kind: "fs", Syscalls: sandbox.ProfileFS}
	}
	p, _ := sandbox.DefaultPolicy("fs", fd)
	return p
}

func (plugin) Configure(_ context.Context, opts map[string]string, files map[string]*os.File, log hclog.Logger) (backend.Device, error) {
	if err := pluginsdk.CheckOptions(opts, append([]string{devopts.OptTag, devopts.OptReadOnly}, devopts.FSOptionKeys...)...); err != nil {
		return nil, err
	}
	dir := files[devopts.FileDir]
	if dir == nil {
		return nil, fmt.Errorf("no %q directory was passed", devopts.FileDir)
	}
	for name := range files {
		if name != devopts.FileDir {
			return nil, fmt.Errorf("unexpected file %q: the plugin takes only the shared directory", name)
		}
	}
	tag := opts[devopts.OptTag]
	if tag == "" {
		return nil, fmt.Errorf("option tag= is required")
	}
	ro, err := pluginsdk.OnOff(opts, devopts.OptReadOnly, false)
	if err != nil {
		return nil, err
	}
	o, err := devopts.ParseFSOptions(opts)
	if err != nil {
		return nil, err
	}
	dev, err := fs.New(fs.Config{
		ServerConfig: fs.ServerConfig{
			Dir: dir, ReadOnly: ro, UIDMap: o.UIDMap, GIDMap: o.GIDMap,
			EntryTimeout: o.Timeout, AttrTimeout: o.Timeout, NoXattr: o.NoXattr,
			AllowSetID: o.AllowSetID, Log: log,
		},
		Tag:     tag,
		Workers: o.Workers,
	})
	// The server keeps its own fd of the directory.
	dir.Close()
	if err != nil {
		return nil, err
	}
	log.Info("serving directory", "tag", tag, "readonly", ro, "xattr", !o.NoXattr, "suid", o.AllowSetID)
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
// the guest holds is an O_PATH fd. It reads the limit with prlimit64 (a
// NULL new limit is what the sandbox's filter allows; x/sys's Getrlimit is
// the getrlimit system call, which the filter refuses and krun-core logs),
// and sets nothing when soft already equals hard, as the sandbox's
// rlimits layer makes it.
func raiseNoFile() {
	var rl unix.Rlimit
	if unix.Prlimit(0, unix.RLIMIT_NOFILE, nil, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		unix.Setrlimit(unix.RLIMIT_NOFILE, &rl)
	}
}
