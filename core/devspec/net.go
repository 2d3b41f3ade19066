package devspec

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	"github.com/krun-core/krun-core/devopts"
)

// MaxPorts bounds the port forwards of one --net.
const MaxPorts = 32

// PortForward forwards a host TCP port to a guest TCP port.
type PortForward struct {
	Host, Guest uint16
}

func (p PortForward) String() string {
	return strconv.Itoa(int(p.Host)) + ":" + strconv.Itoa(int(p.Guest))
}

// NetSpec is a parsed --net option string:
//
//	passt[,mac=52:54:00:12:34:56][,ports=8080:80,8443:443,...][,mtu=N][,passt-arg=ARG]...
//
// After ports=, further items without '=' are more forwards; a bare port N
// means N:N.
type NetSpec struct {
	Backend string // "passt"
	// MAC is the guest's address; nil means Open picks a random locally
	// administered one.
	MAC   net.HardwareAddr
	Ports []PortForward
	// MTU is the device's MTU, told to the guest (VIRTIO_NET_F_MTU) and
	// to passt (--mtu); 0 leaves both at passt's default (65520).
	MTU uint16
	// PasstArgs are extra arguments for passt, one per passt-arg= item,
	// in order (e.g. passt-arg=--no-dhcp-dns).
	PasstArgs []string
}

// MaxPasstArgs bounds the passt-arg= items of one --net.
const MaxPasstArgs = 32

// ParseNet parses a --net option string.
func ParseNet(s string) (*NetSpec, error) {
	opts, err := splitOptions(s)
	if err != nil {
		return nil, err
	}
	n := &NetSpec{}
	if opts[0].hasValue {
		return nil, fmt.Errorf("the first item must name the back-end (passt), not %s", printable(opts[0].key+"="+opts[0].value))
	}
	if opts[0].key != "passt" {
		return nil, fmt.Errorf("unknown network back-end %s (want passt)", printable(opts[0].key))
	}
	n.Backend = opts[0].key
	seen := map[string]bool{}
	inPorts := false
	hostPorts := map[uint16]bool{}
	addPort := func(v string) error {
		p, err := parsePortForward(v)
		if err != nil {
			return err
		}
		if hostPorts[p.Host] {
			return fmt.Errorf("host port %d forwarded twice", p.Host)
		}
		if len(n.Ports) == MaxPorts {
			return fmt.Errorf("more than %d port forwards", MaxPorts)
		}
		hostPorts[p.Host] = true
		n.Ports = append(n.Ports, p)
		return nil
	}
	for _, o := range opts[1:] {
		if !o.hasValue {
			if !inPorts {
				return nil, fmt.Errorf("%s is not key=value", printable(o.key))
			}
			if err := addPort(o.key); err != nil {
				return nil, err
			}
			continue
		}
		inPorts = false
		if o.key == "passt-arg" { // the one key that may repeat
			if o.value == "" || len(n.PasstArgs) == MaxPasstArgs {
				return nil, fmt.Errorf("passt-arg=%s: want a non-empty argument, at most %d of them", printable(o.value), MaxPasstArgs)
			}
			if takesPasstSocket(o.value) {
				return nil, fmt.Errorf("passt-arg=%s: krun-core passes passt its socket itself (-F/--fd); -s/--socket would replace it (give other short options one per passt-arg)", printable(o.value))
			}
			if setsPasstOption(o.value, []string{"mtu"}, 'm') {
				// The guest learns the MTU from the device (mtu=);
				// passt's alone would leave it sending frames passt
				// drops.
				return nil, fmt.Errorf("passt-arg=%s: give the MTU as mtu=N, which tells both passt and the guest", printable(o.value))
			}
			n.PasstArgs = append(n.PasstArgs, o.value)
			continue
		}
		if seen[o.key] {
			return nil, fmt.Errorf("%s given twice", printable(o.key+"="))
		}
		seen[o.key] = true
		switch o.key {
		case "mac":
			mac, err := ParseMAC(o.value)
			if err != nil {
				return nil, err
			}
			n.MAC = mac
		case "ports":
			if err := addPort(o.value); err != nil {
				return nil, err
			}
			inPorts = true
		case "mtu":
			m, err := strconv.ParseUint(o.value, 10, 16)
			if err != nil || m < devopts.MinMTU || m > devopts.MaxMTU {
				return nil, fmt.Errorf("mtu=%s is not a number from %d to %d (passt takes frames of up to 65535 bytes)", printable(o.value), devopts.MinMTU, devopts.MaxMTU)
			}
			n.MTU = uint16(m)
		default:
			return nil, fmt.Errorf("unknown key %s (want mac, ports, mtu, passt-arg)", printable(o.key))
		}
	}
	return n, nil
}

// takesPasstSocket says whether a passt argument would set passt's tap
// connection, which krun-core sets (--fd 3): --fd and --socket (or
// --socket-path) with or without "=VALUE", also abbreviated as
// getopt_long takes them (--sock=), and -F or -s alone or in a group of
// short options ("-qF4"), read as getopt reads a group: up to the first
// option that takes a value, whose value the rest is ("-P/run/s.pid" sets
// -P only).
func takesPasstSocket(a string) bool {
	return setsPasstOption(a, []string{"socket-path", "fd"}, 'F', 's')
}

// setsPasstOption says whether the passt argument a sets one of the long
// options longs (in full or abbreviated to two letters or more, with or
// without "=VALUE") or one of the short options shorts, alone or in a
// group read as getopt reads one (see takesPasstSocket).
func setsPasstOption(a string, longs []string, shorts ...rune) bool {
	if long, ok := strings.CutPrefix(a, "--"); ok {
		name, _, _ := strings.Cut(long, "=")
		return len(name) >= 2 && slices.ContainsFunc(longs, func(l string) bool { return strings.HasPrefix(l, name) })
	}
	group, ok := strings.CutPrefix(a, "-")
	if !ok {
		return false
	}
	for _, c := range group {
		switch {
		case slices.Contains(shorts, c):
			return true
		case strings.ContainsRune(passtValueOptions, c):
			return false // the rest is its value
		}
	}
	return false
}

// passtValueOptions are passt's short options that take a value
// (passt's getopt string, Debian's 0.0~git20230309: "dqfel:hs:F:p:P:m:
// a:n:M:g:i:o:D:S:461t:u:"; pasta's T: U: I:; later passt's H:).
const passtValueOptions = "lsFpPmanMgioDStuTUIH"

// ParseMAC parses a unicast 48-bit MAC address.
func ParseMAC(s string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(s)
	if err != nil || len(mac) != 6 {
		return nil, fmt.Errorf("mac=%s is not a 48-bit MAC address (want e.g. 52:54:00:12:34:56)", printable(s))
	}
	if mac[0]&1 != 0 {
		return nil, fmt.Errorf("mac=%s is a multicast address", printable(s))
	}
	if [6]byte(mac) == [6]byte{} {
		return nil, fmt.Errorf("mac=%s is the all-zero address, which Linux refuses for an interface", printable(s))
	}
	return mac, nil
}

func parsePortForward(v string) (PortForward, error) {
	hs, gs, ok := strings.Cut(v, ":")
	if !ok {
		gs = hs
	}
	h, err1 := parsePort(hs)
	g, err2 := parsePort(gs)
	if err1 != nil || err2 != nil {
		return PortForward{}, fmt.Errorf("ports: %s is not HOST:GUEST with ports 1-65535", printable(v))
	}
	return PortForward{Host: h, Guest: g}, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("not a port")
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("not a port")
	}
	return uint16(n), nil
}

// Kind is net-passt.
func (n *NetSpec) Kind() string { return devopts.KindNetPasst }

// String renders n in --net form.
func (n *NetSpec) String() string {
	var b strings.Builder
	b.WriteString(n.Backend)
	if n.MAC != nil {
		b.WriteString(",mac=" + n.MAC.String())
	}
	for i, p := range n.Ports {
		if i == 0 {
			b.WriteString(",ports=")
		} else {
			b.WriteString(",")
		}
		b.WriteString(p.String())
	}
	if n.MTU != 0 {
		fmt.Fprintf(&b, ",mtu=%d", n.MTU)
	}
	for _, a := range n.PasstArgs {
		b.WriteString(",passt-arg=" + escape(a))
	}
	return b.String()
}
