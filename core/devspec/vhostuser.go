package devspec

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/krun-core/krun-core/devopts"
)

// Virtio device IDs of the named --vhost-user types.
const (
	VirtioNet = 1
	VirtioBlk = 2
	VirtioFS  = 26
)

// vhostUserTypes are the device types --vhost-user names.
var vhostUserTypes = map[string]uint32{"net": VirtioNet, "blk": VirtioBlk, "fs": VirtioFS}

// Limits of a --vhost-user device.
const (
	// MaxVhostUserQueues bounds queues= (a virtio-mmio device has at most
	// 256 queues; fs adds its high-priority queue).
	MaxVhostUserQueues = 64
	// MaxVhostUserQueueSize bounds queue-size= (split virtqueues).
	MaxVhostUserQueueSize = 32768
	// maxVirtioID bounds a numeric type= (virtio device IDs are small).
	maxVirtioID = 255
	// MaxReconnect bounds reconnect= (seconds between attempts).
	MaxReconnect = 3600
)

// VhostUserSpec is a parsed --vhost-user option string: an external
// vhost-user back-end that krun-core did not start and does not sandbox
// (qemu-storage-daemon, virtiofsd, a vhost-device-* daemon, another
// krun-core serve):
//
//	type=blk|fs|net|TYPE_ID,socket=PATH[,queues=N][,queue-size=N][,tag=TAG][,reconnect=SECONDS]
//
// queues= is the number of request queues: virtio-blk queues (default 1),
// virtio-fs request queues besides the high-priority queue (default 1), or
// the queues of a numeric type (default 1); net has one receive and one
// transmit queue. 0 means the default. queue-size= is the largest ring the
// driver may set up (default 128 for blk and fs, as QEMU's vhost-user
// devices, 256 otherwise). tag= (fs only) is the mount tag when the
// back-end has no config space of its own (the C virtiofsd). reconnect=
// (as QEMU's chardev option) makes the core connect again, every SECONDS,
// to a back-end that disconnected while the guest ran, and replay the
// requests it had in flight; not for fs, whose back-end holds the guest's
// open files.
type VhostUserSpec struct {
	TypeName  string // "blk", "fs", "net" or the decimal device ID
	Type      uint32 // virtio device ID
	Socket    string
	Queues    int
	QueueSize int
	Tag       string
	// Reconnect is the interval between attempts to connect again after
	// the back-end disconnected; 0: the device fails instead.
	Reconnect time.Duration
}

// ParseVhostUser parses a --vhost-user option string.
func ParseVhostUser(s string) (*VhostUserSpec, error) {
	opts, err := splitOptions(s)
	if err != nil {
		return nil, err
	}
	var typ, socket, tag string
	var queues, qsize int
	var reconnect time.Duration
	seen := map[string]bool{}
	for _, o := range opts {
		if !o.hasValue {
			return nil, fmt.Errorf("%s is not key=value", printable(o.key))
		}
		if seen[o.key] {
			return nil, fmt.Errorf("%s given twice", printable(o.key+"="))
		}
		seen[o.key] = true
		switch o.key {
		case "type":
			typ = o.value
		case "socket":
			socket = o.value
		case "tag":
			tag = o.value
		case "queues":
			if queues, err = parseCount(o.key, o.value, 1, MaxVhostUserQueues); err != nil {
				return nil, err
			}
		case "queue-size":
			if qsize, err = parseCount(o.key, o.value, 1, MaxVhostUserQueueSize); err != nil {
				return nil, err
			}
		case "reconnect":
			sec, perr := strconv.ParseFloat(o.value, 64)
			if !decimalSeconds(o.value) || perr != nil || !(sec >= 0.001 && sec <= MaxReconnect) {
				return nil, fmt.Errorf("reconnect=%s: want seconds from 0.001 to %d", printable(o.value), MaxReconnect)
			}
			reconnect = time.Duration(sec * float64(time.Second)).Round(time.Millisecond)
		default:
			return nil, fmt.Errorf("unknown key %s (want type, socket, queues, queue-size, tag, reconnect)", printable(o.key))
		}
	}
	if !seen["type"] {
		return nil, errors.New("type= is required (blk, fs, net or a virtio device ID)")
	}
	if !seen["socket"] {
		return nil, errors.New("socket= is required (the back-end's unix socket)")
	}
	v, err := NewVhostUser(typ, socket, queues, qsize, tag)
	if err != nil {
		return nil, err
	}
	if err := v.SetReconnect(reconnect); err != nil {
		return nil, err
	}
	return v, nil
}

// SetReconnect sets the interval between attempts to connect again to a
// back-end that disconnected (0: none). A virtio-fs back-end is never
// reconnected: the guest's FUSE node IDs and open files were its own.
func (v *VhostUserSpec) SetReconnect(every time.Duration) error {
	switch {
	case every == 0:
	case every < time.Millisecond || every > MaxReconnect*time.Second:
		return fmt.Errorf("reconnect=%v: want 1 ms to %d seconds", every, MaxReconnect)
	case v.Type == VirtioFS:
		return errors.New("reconnect= is not for type=fs: a new virtio-fs back-end cannot honour the guest's open files and FUSE node IDs")
	}
	v.Reconnect = every
	return nil
}

// NewVhostUser checks and builds a VhostUserSpec; queues and queueSize 0
// take the type's defaults, and tag is for fs only.
func NewVhostUser(typ, socket string, queues, queueSize int, tag string) (*VhostUserSpec, error) {
	v := &VhostUserSpec{TypeName: typ, Socket: socket, Queues: queues, QueueSize: queueSize, Tag: tag}
	if id, ok := vhostUserTypes[typ]; ok {
		v.Type = id
	} else {
		n, err := strconv.ParseUint(typ, 10, 32)
		if err != nil || n == 0 || n > maxVirtioID {
			return nil, fmt.Errorf("type=%s: want blk, fs, net or a virtio device ID from 1 to %d", printable(typ), maxVirtioID)
		}
		v.Type, v.TypeName = uint32(n), strconv.FormatUint(n, 10)
		for name, id := range vhostUserTypes {
			if id == v.Type {
				v.TypeName = name // type=2 is blk
			}
		}
	}
	if err := checkPath("socket", socket); err != nil {
		return nil, err
	}
	if len(socket) > 107 {
		return nil, fmt.Errorf("socket=%s is longer than the 107 bytes a unix socket path may have", printable(socket))
	}
	switch {
	case queues < 0 || queues > MaxVhostUserQueues:
		return nil, fmt.Errorf("queues=%d: want 1 to %d", queues, MaxVhostUserQueues)
	case queueSize < 0 || queueSize > MaxVhostUserQueueSize || queueSize&(queueSize-1) != 0:
		return nil, fmt.Errorf("queue-size=%d: want a power of two up to %d", queueSize, MaxVhostUserQueueSize)
	case v.Type == VirtioNet && queues > 1:
		return nil, errors.New("queues= for net: one receive and one transmit queue only (several queue pairs need a control queue, which the core does not emulate)")
	}
	if tag != "" {
		if v.Type != VirtioFS {
			return nil, errors.New("tag= is for type=fs only")
		}
		if err := checkTag(tag); err != nil {
			return nil, err
		}
	}
	return v, nil
}

// decimalSeconds says whether s is seconds written DIGITS[.DIGITS]:
// ParseFloat also takes 0x1p0, 1e3 and 1_0.
func decimalSeconds(s string) bool {
	i, f, dot := strings.Cut(s, ".")
	_, iok := devopts.Decimal(i)
	return iok && (!dot || strings.Trim(f, "0123456789") == "" && f != "")
}

// parseCount parses a decimal count in [min, max].
func parseCount(key, s string, min, max int) (int, error) {
	n, ok := devopts.Decimal(s)
	if !ok || n < min || n > max {
		return 0, fmt.Errorf("%s=%s: want a number from %d to %d", key, printable(s), min, max)
	}
	return n, nil
}

// RequestQueues is queues= or the default, 1.
func (v *VhostUserSpec) RequestQueues() int {
	if v.Queues == 0 {
		return 1
	}
	return v.Queues
}

// NumQueues is how many virtqueues the device has: fs adds its
// high-priority queue, net has a receive and a transmit queue.
func (v *VhostUserSpec) NumQueues() int {
	switch v.Type {
	case VirtioFS:
		return 1 + v.RequestQueues()
	case VirtioNet:
		return 2
	}
	return v.RequestQueues()
}

// MaxQueueSize is queue-size= or the type's default.
func (v *VhostUserSpec) MaxQueueSize() int {
	switch {
	case v.QueueSize != 0:
		return v.QueueSize
	case v.Type == VirtioBlk || v.Type == VirtioFS:
		return 128
	}
	return 256
}

// Kind names the device in messages ("vhost-user-blk"); it is not a plugin
// kind: nothing is launched for it.
func (v *VhostUserSpec) Kind() string { return "vhost-user-" + v.TypeName }

// String renders v in --vhost-user form.
func (v *VhostUserSpec) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "type=%s,socket=%s", v.TypeName, escape(v.Socket))
	if v.Queues != 0 {
		fmt.Fprintf(&b, ",queues=%d", v.Queues)
	}
	if v.QueueSize != 0 {
		fmt.Fprintf(&b, ",queue-size=%d", v.QueueSize)
	}
	if v.Tag != "" {
		fmt.Fprintf(&b, ",tag=%s", escape(v.Tag))
	}
	if v.Reconnect != 0 {
		fmt.Fprintf(&b, ",reconnect=%s", strconv.FormatFloat(v.Reconnect.Round(time.Millisecond).Seconds(), 'f', -1, 64))
	}
	return b.String()
}

// ErrExternal is returned by VhostUserSpec.Open: an external back-end is
// connected to, not opened for a plugin.
var ErrExternal = errors.New("an external vhost-user back-end has no plugin to open files for")

// Open is not used for an external back-end (see ErrExternal).
func (v *VhostUserSpec) Open(OpenOptions) (*Opened, error) { return nil, ErrExternal }

// CheckSocket checks, before anything starts, that the back-end's socket
// exists and is a socket.
func (v *VhostUserSpec) CheckSocket() error {
	st, err := os.Stat(v.Socket)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return fmt.Errorf("vhost-user back-end socket %s: %w", v.Socket, err)
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("vhost-user back-end socket %s is not a socket", v.Socket)
	}
	return nil
}
