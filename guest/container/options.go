package container

import (
	"fmt"
	"strings"
)

// Mount flag bits (include/uapi/linux/mount.h); the same values as
// golang.org/x/sys/unix's MS_* on every Linux architecture.
const (
	msRdonly      = 0x1
	msNosuid      = 0x2
	msNodev       = 0x4
	msNoexec      = 0x8
	msSynchronous = 0x10
	msRemount     = 0x20
	msMandlock    = 0x40
	msDirsync     = 0x80
	msNosymfollow = 0x100
	msNoatime     = 0x400
	msNodiratime  = 0x800
	msBind        = 0x1000
	msRec         = 0x4000
	msSilent      = 0x8000
	msUnbindable  = 0x20000
	msPrivate     = 0x40000
	msSlave       = 0x80000
	msShared      = 0x100000
	msRelatime    = 0x200000
	msStrictatime = 0x1000000
	msLazytime    = 0x2000000
)

// Options is a parsed mount option list.
type Options struct {
	// Flags are the mount(2) flags to set.
	Flags uintptr
	// Clear are the flags an option turned off explicitly (rw, suid,
	// dev, exec, ...); on a bind remount they are left off.
	Clear uintptr
	// Propagation is the propagation change to apply after the mount (0
	// for none): one of msPrivate, msSlave, msShared, msUnbindable,
	// possibly with msRec.
	Propagation uintptr
	// Bind is set by "bind" and "rbind" (Recursive for rbind).
	Bind, Recursive bool
	// TmpCopyUp copies what was under a tmpfs mount point into it
	// (crun's tmpcopyup extension, which podman uses).
	TmpCopyUp bool
	// Data are the file-system specific options (size=, mode=, ...),
	// comma-joined, for mount(2)'s data argument.
	Data string
}

type flagOpt struct {
	set   bool
	flags uintptr
}

// flagOptions are the generic mount options, as mount(8) names them.
var flagOptions = map[string]flagOpt{
	"ro":            {true, msRdonly},
	"rw":            {false, msRdonly},
	"nosuid":        {true, msNosuid},
	"suid":          {false, msNosuid},
	"nodev":         {true, msNodev},
	"dev":           {false, msNodev},
	"noexec":        {true, msNoexec},
	"exec":          {false, msNoexec},
	"sync":          {true, msSynchronous},
	"async":         {false, msSynchronous},
	"dirsync":       {true, msDirsync},
	"mand":          {true, msMandlock},
	"nomand":        {false, msMandlock},
	"noatime":       {true, msNoatime},
	"atime":         {false, msNoatime},
	"nodiratime":    {true, msNodiratime},
	"diratime":      {false, msNodiratime},
	"relatime":      {true, msRelatime},
	"norelatime":    {false, msRelatime},
	"strictatime":   {true, msStrictatime},
	"nostrictatime": {false, msStrictatime},
	"lazytime":      {true, msLazytime},
	"nolazytime":    {false, msLazytime},
	"nosymfollow":   {true, msNosymfollow},
	"symfollow":     {false, msNosymfollow},
	"silent":        {true, msSilent},
	"loud":          {false, msSilent},
	"defaults":      {false, 0},
}

var propagationOptions = map[string]uintptr{
	"private":     msPrivate,
	"rprivate":    msPrivate | msRec,
	"shared":      msShared,
	"rshared":     msShared | msRec,
	"slave":       msSlave,
	"rslave":      msSlave | msRec,
	"unbindable":  msUnbindable,
	"runbindable": msUnbindable | msRec,
}

// refusedOptions are generic options a guest cannot honour; naming them
// is an error rather than a silent difference.
var refusedOptions = map[string]string{
	"idmap":   "ID-mapped mounts are not supported in the guest",
	"ridmap":  "ID-mapped mounts are not supported in the guest",
	"remount": "a remount of a mount the guest has not made",
}

// KnownOptions are the option names ParseOptions gives a meaning to
// beyond file-system data (for the runtime's features list).
func KnownOptions() []string {
	var out []string
	for k := range flagOptions {
		out = append(out, k)
	}
	for k := range propagationOptions {
		out = append(out, k)
	}
	return append(out, "bind", "rbind", "tmpcopyup")
}

// ParseOptions splits a mount option list into flags, a propagation
// change and file-system data. Options with "=" and unknown words are
// file-system data (the kernel checks them); the options a guest cannot
// honour are an error.
func ParseOptions(opts []string) (*Options, error) {
	o := &Options{}
	var data []string
	for _, opt := range opts {
		if opt == "" || strings.ContainsAny(opt, "\x00,") {
			return nil, fmt.Errorf("mount option %q", opt)
		}
		if why, ok := refusedOptions[opt]; ok {
			return nil, fmt.Errorf("mount option %s: %s", opt, why)
		}
		if f, ok := flagOptions[opt]; ok {
			if f.set {
				o.Flags |= f.flags
				o.Clear &^= f.flags
			} else {
				o.Flags &^= f.flags
				o.Clear |= f.flags
			}
			continue
		}
		if p, ok := propagationOptions[opt]; ok {
			o.Propagation = p
			continue
		}
		switch opt {
		case "bind":
			o.Bind = true
			continue
		case "rbind":
			o.Bind, o.Recursive = true, true
			continue
		case "tmpcopyup":
			o.TmpCopyUp = true
			continue
		}
		data = append(data, opt)
	}
	o.Data = strings.Join(data, ",")
	if len(o.Data) > 4095 {
		return nil, fmt.Errorf("mount data of %d bytes", len(o.Data))
	}
	return o, nil
}
