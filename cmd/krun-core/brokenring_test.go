package main

import (
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestServeRingBrokenByTheGuest: a front-end whose ring turns to garbage (an
// available index moved by 0x3030, text where the ring had been) gets that
// ring stopped, and nothing else: serve does not restart its plugin, the
// connection stays, and the front-end starts the ring again on it, as at a
// driver's device reset. serve restarted the plugin, which ended QEMU's
// connection (no reconnect=) and left the disk dead for good (e2e/blk
// TestQCOW2 in CI: firmware's ring, its memory reused by the kernel).
func TestServeRingBrokenByTheGuest(t *testing.T) {
	bin := soakBin(t, "blk-raw")
	img, sock := zeroDisk(t, t.TempDir())
	s := startServe(t, bin, "--socket", sock, "--disk", "path="+img+",format=raw")
	waitSocket(t, s, sock)
	pid := servingPid(t, s)

	c, err := frontend.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	f := &soakFrontend{c: c}
	defer f.close()
	for _, st := range soakSteps {
		if err := st.do(f); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
	}
	_, avail, _ := f.r.Addrs()
	idx, err := f.mem.Bytes(avail+2, 2)
	if err != nil {
		t.Fatal(err)
	}
	saved := binary.LittleEndian.Uint16(idx)
	binary.LittleEndian.PutUint16(idx, 0x3030)
	if err := f.r.KickAlways(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(s.log(), "the guest broke a queue") {
		if time.Now().After(deadline) {
			t.Fatal("no word of the broken queue in 20s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// serve asks its plugin's health every HealthInterval (2 s); two of
	// them pass.
	time.Sleep(4500 * time.Millisecond)
	if log := s.log(); strings.Contains(log, "restarting") {
		t.Fatalf("serve restarted its plugin for a ring the guest broke")
	}
	if got := servingPid(t, s); got != pid {
		t.Fatalf("plugin pid %d, was %d", got, pid)
	}

	// The driver's reset: the ring stops, and starts again.
	if _, err := c.GetVringBase(0); err != nil {
		t.Fatalf("GET_VRING_BASE after the broken ring: %v", err)
	}
	binary.LittleEndian.PutUint16(idx, saved)
	q := f.r.Setup()
	q.Base = f.r.UsedIdx()
	if err := c.SetupQueue(q, true); err != nil {
		t.Fatalf("the ring's restart: %v", err)
	}
	if err := soakSteps[len(soakSteps)-1].do(f); err != nil {
		t.Fatalf("a request on the restarted ring: %v", err)
	}
}
