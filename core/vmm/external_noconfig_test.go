package vmm

import (
	"bytes"
	"context"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/mmio"
	"github.com/krun-core/krun-core/guestmem"
)

// TestExternalNetWithoutConfigAttaches: an external vhost-user-net
// back-end without VHOST_USER_PROTOCOL_F_CONFIG (adjustExternal masks the
// config-space features and gives it an empty config space of the core's
// own) attaches, and the guest reads zeros from its config space. (From
// review: attach read configSize(net, offered) >= 6 bytes from the empty
// config space and failed.)
func TestExternalNetWithoutConfigAttaches(t *testing.T) {
	c := NewContext(hclog.NewNullLogger())
	sock := serveFake(t, &fakeDevice{typ: 1, queues: 2, features: netFMAC | netFStatus | 1<<0})
	d, err := c.connectExternal(context.Background(), 0, externalSpec(t, "type=net,socket="+sock))
	if err != nil {
		t.Fatal(err)
	}
	defer d.shutdown(c.log)
	f, err := guestmem.NewMemfd("test-ram", 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, err := guestmem.Map([]guestmem.Region{{GuestAddr: 0, Size: 16 << 20, File: f}})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	m := &machine{log: c.log, mem: mem, memFile: f, testWiring: nopWiring{}, devices: []*pluginDevice{d}, events: make(chan event, 1)}
	if err := m.attachDevices(); err != nil {
		t.Fatalf("attach: %v", err)
	}
	got := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	d.dev.Read(mmio.RegConfig, got)
	if !bytes.Equal(got, make([]byte, 6)) {
		t.Errorf("config space reads % x, want zeros", got)
	}
}
