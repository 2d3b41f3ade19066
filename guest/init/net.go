package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/initconfig"
)

// findVirtioNet waits for the first interface driven by virtio_net.
func findVirtioNet(timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		links, _ := filepath.Glob("/sys/class/net/*/device/driver")
		sort.Strings(links)
		for _, l := range links {
			target, err := os.Readlink(l)
			if err == nil && filepath.Base(target) == "virtio_net" {
				return filepath.Base(filepath.Dir(filepath.Dir(l))), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-net interface after %v", timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func ifIndex(name string) (int, error) {
	b, err := os.ReadFile("/sys/class/net/" + name + "/ifindex")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// setupNetwork brings up lo and the virtio-net interface, with an address
// from DHCP or from the config, a default route and /etc/resolv.conf.
func setupNetwork(log *logger, n *initconfig.Network, timeout time.Duration) error {
	nl, err := dialNetlink()
	if err != nil {
		return err
	}
	defer nl.Close()
	if lo, err := ifIndex("lo"); err == nil {
		if err := nl.setLink(lo, 0); err != nil {
			return err
		}
	}
	name, err := findVirtioNet(5 * time.Second)
	if err != nil {
		return err
	}
	idx, err := ifIndex(name)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := nl.setLink(idx, n.MTU); err != nil {
		return err
	}
	var addr netip.Prefix
	var gw netip.Addr
	dns := n.DNS
	if n.DHCP {
		ifc, err := net.InterfaceByIndex(idx)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		lease, err := dhcpLease(log, idx, ifc.HardwareAddr, timeout)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		addr = lease.prefix()
		if len(lease.Routers) > 0 {
			gw = lease.Routers[0]
		}
		if len(dns) == 0 {
			for _, d := range lease.DNS {
				dns = append(dns, d.String())
			}
		}
		if lease.MTU != 0 && n.MTU == 0 {
			log.Printf("%s: DHCP offers MTU %d; keeping the device's", name, lease.MTU)
		}
	} else {
		if addr, err = netip.ParsePrefix(n.Address); err != nil {
			return fmt.Errorf("address %q: %w", n.Address, err)
		}
		if n.Gateway != "" {
			if gw, err = netip.ParseAddr(n.Gateway); err != nil {
				return fmt.Errorf("gateway %q: %w", n.Gateway, err)
			}
		}
	}
	if err := nl.addAddr(idx, addr); err != nil {
		return err
	}
	if gw.IsValid() {
		if err := nl.addDefaultRoute(idx, addr, gw); err != nil {
			return err
		}
	}
	log.Printf("%s: %v via %v, dns %v", name, addr, gw, dns)
	if len(dns) > 0 {
		writeResolvConf(log, dns)
	}
	return nil
}

// writeResolvConf writes /etc/resolv.conf into the root. When the root
// has no writable /etc but does have the file, a copy on /run is bind
// mounted over it; otherwise resolv.conf is skipped with a log line.
func writeResolvConf(log *logger, dns []string) {
	var b strings.Builder
	b.WriteString("# written by krun-init\n")
	for _, d := range dns {
		fmt.Fprintf(&b, "nameserver %s\n", d)
	}
	content := []byte(b.String())
	err := writeRegularFile("/etc/resolv.conf", content)
	if err == nil {
		return
	}
	if _, serr := os.Stat("/etc/resolv.conf"); serr == nil {
		if merr := bindResolvConf(content); merr == nil {
			return
		} else {
			err = errors.Join(err, merr)
		}
	}
	log.Printf("skipped /etc/resolv.conf (the root has no writable /etc): %v", err)
}

func bindResolvConf(content []byte) error {
	if err := os.MkdirAll("/run/krun", 0o755); err != nil {
		return err
	}
	if err := os.WriteFile("/run/krun/resolv.conf", content, 0o644); err != nil {
		return err
	}
	return unix.Mount("/run/krun/resolv.conf", "/etc/resolv.conf", "", unix.MS_BIND, "")
}

// writeRegularFile writes content to name (a file of the root, following
// symbolic links as any program would), creating it when missing, without
// opening anything but a regular file: a FIFO would block PID 1 for good
// (nothing opens its other end), a device may act on open. As openFile:
// the path is opened O_PATH, checked, and reopened through /proc/self/fd.
func writeRegularFile(name string, content []byte) error {
	fd, err := unix.Open(name, unix.O_PATH|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		// Missing, or a dangling link (resolv.conf -> /run/...), which
		// is followed and its target made, as before. O_NONBLOCK: a
		// FIFO that appeared meanwhile fails (ENXIO) instead of
		// blocking; truncated only once it is found regular.
		f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|unix.O_NONBLOCK|unix.O_NOCTTY, 0o644)
		if err != nil {
			return err
		}
		if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
			f.Close()
			return fmt.Errorf("%s: not a regular file", name)
		}
		if err := f.Truncate(0); err != nil {
			f.Close()
			return err
		}
		return writeClose(f, content)
	}
	if err != nil {
		return &os.PathError{Op: "open", Path: name, Err: err}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &os.PathError{Op: "stat", Path: name, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("%s: not a regular file", name)
	}
	f, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(fd), os.O_WRONLY|os.O_TRUNC|unix.O_NOCTTY, 0)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return writeClose(f, content)
}

func writeClose(f *os.File, content []byte) error {
	_, err := f.Write(content)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
