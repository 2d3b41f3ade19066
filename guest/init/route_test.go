package main

import (
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/internal/netnstest"
)

// TestDefaultRouteGatewayOutsidePrefix: a DHCP lease or a static
// configuration may give a /32 address (passt copies the host's, and many
// cloud hosts have one) or any prefix that does not hold the gateway. The
// default route must still be made, on the link; a gateway inside the
// prefix gets a plain route.
func TestDefaultRouteGatewayOutsidePrefix(t *testing.T) {
	tests := []struct {
		name, addr, gw string
		onlink         bool
	}{
		{name: "slash 32", addr: "10.9.0.5/32", gw: "10.9.0.1", onlink: true},
		{name: "gateway in another subnet", addr: "10.9.0.5/24", gw: "10.8.0.1", onlink: true},
		{name: "gateway in the subnet", addr: "10.9.0.5/24", gw: "10.9.0.1"},
		{name: "slash 31 peer", addr: "10.9.0.4/31", gw: "10.9.0.5"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := netnstest.New(t)
			for _, args := range [][]string{
				{"-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"},
				{"-n", ns, "link", "set", "d0", "up"},
				// netnstest's own default route would be replaced;
				// take it away so that the route seen is ours.
				{"-n", ns, "route", "del", "default"},
			} {
				if b, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
					t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, b)
				}
			}
			addr := netip.MustParsePrefix(tt.addr)
			gw := netip.MustParseAddr(tt.gw)
			err := netnstest.Run(ns, func() error {
				ifc, err := net.InterfaceByName("d0")
				if err != nil {
					return err
				}
				nl, err := dialNetlink()
				if err != nil {
					return err
				}
				defer nl.Close()
				if err := nl.addAddr(ifc.Index, addr); err != nil {
					return err
				}
				return nl.addDefaultRoute(ifc.Index, addr, gw)
			})
			if err != nil {
				t.Fatalf("address %v, gateway %v: %v", addr, gw, err)
			}
			b, err := exec.Command("ip", "-n", ns, "route", "show", "default").CombinedOutput()
			if err != nil {
				t.Fatalf("ip route show: %v\n%s", err, b)
			}
			got := strings.TrimSpace(string(b))
			if !strings.HasPrefix(got, "default via "+tt.gw+" dev d0") {
				t.Fatalf("default route %q, want via %s dev d0", got, tt.gw)
			}
			if strings.Contains(got, "onlink") != tt.onlink {
				t.Errorf("default route %q: onlink %v, want %v", got, !tt.onlink, tt.onlink)
			}
		})
	}
}
