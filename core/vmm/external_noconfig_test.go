package vmm

import (
	"bytes"
	"context"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/mmio"
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
	m := newDeviceMachine(t, c.log, []*pluginDevice{d})
	if err := m.attachDevices(); err != nil {
		t.Fatalf("attach: %v", err)
	}
	got := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	d.dev.Read(mmio.RegConfig, got)
	if !bytes.Equal(got, make([]byte, 6)) {
		t.Errorf("config space reads % x, want zeros", got)
	}
}
