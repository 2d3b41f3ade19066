package main

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// netlinkConn is a minimal rtnetlink client: requests with an ACK, for the
// few changes init makes (link up, MTU, address, default route).
type netlinkConn struct {
	fd  int
	seq uint32
}

func dialNetlink() (*netlinkConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	return &netlinkConn{fd: fd}, nil
}

func (c *netlinkConn) Close() error { return unix.Close(c.fd) }

var ne = binary.NativeEndian

// rtattr appends one route attribute (aligned to 4 bytes).
func rtattr(b []byte, typ uint16, data []byte) []byte {
	l := 4 + len(data)
	b = ne.AppendUint16(b, uint16(l))
	b = ne.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func u32(v uint32) []byte { return ne.AppendUint32(nil, v) }

// request sends one message and waits for its acknowledgement.
func (c *netlinkConn) request(typ, flags uint16, body []byte) error {
	c.seq++
	msg := make([]byte, 0, unix.NLMSG_HDRLEN+len(body))
	msg = ne.AppendUint32(msg, uint32(unix.NLMSG_HDRLEN+len(body)))
	msg = ne.AppendUint16(msg, typ)
	msg = ne.AppendUint16(msg, flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	msg = ne.AppendUint32(msg, c.seq)
	msg = ne.AppendUint32(msg, 0)
	msg = append(msg, body...)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 16<<10)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		done, err := parseAck(buf[:n], c.seq)
		if done || err != nil {
			return err
		}
	}
}

// parseAck walks netlink messages looking for the NLMSG_ERROR answering
// seq; done reports that it was found (err is then the kernel's verdict).
func parseAck(b []byte, seq uint32) (done bool, err error) {
	for len(b) >= unix.NLMSG_HDRLEN {
		l := ne.Uint32(b)
		if l < unix.NLMSG_HDRLEN || uint64(l) > uint64(len(b)) {
			return true, fmt.Errorf("netlink: malformed message of length %d", l)
		}
		typ, mseq := ne.Uint16(b[4:]), ne.Uint32(b[8:])
		if typ == unix.NLMSG_ERROR && mseq == seq {
			if l < unix.NLMSG_HDRLEN+4 {
				return true, fmt.Errorf("netlink: short error message")
			}
			if e := int32(ne.Uint32(b[unix.NLMSG_HDRLEN:])); e != 0 {
				return true, unix.Errno(-e)
			}
			return true, nil
		}
		adv := (uint64(l) + 3) &^ 3
		if adv > uint64(len(b)) {
			break
		}
		b = b[adv:]
	}
	return false, nil
}

// setLink sets IFF_UP and, when mtu > 0, the MTU.
func (c *netlinkConn) setLink(index int, mtu int) error {
	body := make([]byte, 0, 32)
	body = append(body, unix.AF_UNSPEC, 0)
	body = ne.AppendUint16(body, 0)
	body = ne.AppendUint32(body, uint32(index))
	body = ne.AppendUint32(body, unix.IFF_UP) // flags
	body = ne.AppendUint32(body, unix.IFF_UP) // change
	if mtu > 0 {
		body = rtattr(body, unix.IFLA_MTU, u32(uint32(mtu)))
	}
	if err := c.request(unix.RTM_NEWLINK, 0, body); err != nil {
		return fmt.Errorf("set link %d up (mtu %d): %w", index, mtu, err)
	}
	return nil
}

// addAddr adds an IPv4 address with its broadcast address.
func (c *netlinkConn) addAddr(index int, p netip.Prefix) error {
	a := p.Addr().As4()
	bcast := a
	bits := p.Bits()
	for i := bits; i < 32; i++ {
		bcast[i/8] |= 0x80 >> (i % 8)
	}
	body := []byte{unix.AF_INET, byte(bits), 0, unix.RT_SCOPE_UNIVERSE}
	body = ne.AppendUint32(body, uint32(index))
	body = rtattr(body, unix.IFA_LOCAL, a[:])
	body = rtattr(body, unix.IFA_ADDRESS, a[:])
	if bits < 31 {
		body = rtattr(body, unix.IFA_BROADCAST, bcast[:])
	}
	if err := c.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, body); err != nil {
		return fmt.Errorf("add address %v: %w", p, err)
	}
	return nil
}

// addDefaultRoute adds "default via gw dev index", with "onlink" when gw
// is outside the interface's prefix: a DHCP server (passt on a host whose
// address is a /32, as on many cloud machines) or a static configuration
// can give an address whose subnet does not hold the gateway, and the
// kernel refuses such a route (ENETUNREACH) unless told the gateway is
// reachable on the link.
func (c *netlinkConn) addDefaultRoute(index int, p netip.Prefix, gw netip.Addr) error {
	g := gw.As4()
	body := []byte{unix.AF_INET, 0, 0, 0, unix.RT_TABLE_MAIN, unix.RTPROT_BOOT, unix.RT_SCOPE_UNIVERSE, unix.RTN_UNICAST}
	var flags uint32
	if !p.Masked().Contains(gw) {
		flags |= unix.RTNH_F_ONLINK
	}
	body = ne.AppendUint32(body, flags)
	body = rtattr(body, unix.RTA_GATEWAY, g[:])
	body = rtattr(body, unix.RTA_OIF, u32(uint32(index)))
	if err := c.request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, body); err != nil {
		return fmt.Errorf("add default route via %v: %w", gw, err)
	}
	return nil
}
