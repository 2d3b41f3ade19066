package vmm

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/krun-core/krun-core/core/devspec"
)

// TestPortMapGoesToOneNetDevice: SetPortMap's forwards go to one passt,
// the first network device's. Given to every --net device, each passt
// bound the same host ports and the second one exited ("Failed to bind
// any port"); a host port the device forwards already made passt exit at
// start ("Overlapping port specifier"), which Start now refuses instead.
func TestPortMapGoesToOneNetDevice(t *testing.T) {
	pf := func(h, g uint16) devspec.PortForward { return devspec.PortForward{Host: h, Guest: g} }
	for _, tt := range []struct {
		name    string
		nets    [][]devspec.PortForward // one --net device each, with its ports=
		portMap []string
		want    [][]devspec.PortForward // each device's forwards afterwards
		wantErr bool
	}{
		{name: "no --net: one is added", portMap: []string{"8080:80"}, want: [][]devspec.PortForward{{pf(8080, 80)}}},
		{name: "one --net", nets: [][]devspec.PortForward{{pf(2222, 22)}}, portMap: []string{"8080:80"},
			want: [][]devspec.PortForward{{pf(2222, 22), pf(8080, 80)}}},
		{name: "two --net: the first gets the map", nets: [][]devspec.PortForward{nil, {pf(2222, 22)}}, portMap: []string{"8080:80", "8443:443"},
			want: [][]devspec.PortForward{{pf(8080, 80), pf(8443, 443)}, {pf(2222, 22)}}},
		{name: "a host port forwarded by --net too", nets: [][]devspec.PortForward{{pf(8080, 80)}}, portMap: []string{"8080:81"}, wantErr: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// prepTestExec's module tree, with virtio_net built in.
			mods := t.TempDir()
			os.MkdirAll(filepath.Join(mods, "kernel"), 0o755)
			os.WriteFile(filepath.Join(mods, "modules.order"), nil, 0o644)
			os.WriteFile(filepath.Join(mods, "modules.builtin"), []byte("kernel/drivers/virtio/virtio_mmio.ko\nkernel/fs/fuse/virtiofs.ko\n"+
				"kernel/drivers/char/virtio_console.ko\nkernel/drivers/net/virtio_net.ko\n"), 0o644)
			c, err := prepTestExecErr(t, nil, func(c *Context) {
				c.SetModulesDir(mods)
				for _, ports := range tt.nets {
					c.AddDevice(&devspec.NetSpec{Backend: "passt", Ports: slices.Clone(ports)})
				}
				if err := c.SetPortMap(tt.portMap); err != nil {
					t.Fatal(err)
				}
			})
			if tt.wantErr {
				if !errors.Is(err, ErrConfig) {
					t.Fatalf("prepareExec = %v, want a configuration error", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got [][]devspec.PortForward
			for _, d := range c.devices {
				if n, ok := d.(*devspec.NetSpec); ok {
					got = append(got, n.Ports)
				}
			}
			if !slices.EqualFunc(got, tt.want, slices.Equal) {
				t.Fatalf("the network devices forward %v, want %v", got, tt.want)
			}
		})
	}
}

// TestHostPortOfTwoNetDevices: each --net device has a passt of its own,
// and two passts cannot bind one host port: the second exited at start
// and every restart failed alike until the device failed. Validate
// refuses it before anything starts.
func TestHostPortOfTwoNetDevices(t *testing.T) {
	pf := func(h, g uint16) devspec.PortForward { return devspec.PortForward{Host: h, Guest: g} }
	for _, tt := range []struct {
		name    string
		nets    [][]devspec.PortForward
		wantErr bool
	}{
		{name: "one device", nets: [][]devspec.PortForward{{pf(8080, 80), pf(8443, 443)}}},
		{name: "two devices, other host ports", nets: [][]devspec.PortForward{{pf(8080, 80)}, {pf(8081, 80)}}},
		{name: "two devices without forwards", nets: [][]devspec.PortForward{nil, nil}},
		{name: "two devices, one host port", nets: [][]devspec.PortForward{{pf(2222, 22), pf(8080, 80)}, {pf(8080, 81)}}, wantErr: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := NewContext(nil)
			c.AddDevice(&devspec.DiskSpec{Path: "d.img", Format: "raw"})
			for _, ports := range tt.nets {
				c.AddDevice(&devspec.NetSpec{Backend: "passt", Ports: ports})
			}
			err := c.checkHostPorts()
			if tt.wantErr != (err != nil) || err != nil && !errors.Is(err, ErrConfig) {
				t.Fatalf("checkHostPorts = %v, want an error: %v", err, tt.wantErr)
			}
		})
	}
}
