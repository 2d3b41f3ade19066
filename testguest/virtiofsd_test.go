package testguest

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/daemontest"
	"github.com/krun-core/krun-core/vhostuser"
)

const virtiofsdPath = "/usr/lib/qemu/virtiofsd"

// startVirtiofsd runs QEMU's C virtiofsd on a temp directory and returns its
// socket path once it listens.
func startVirtiofsd(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(virtiofsdPath); err != nil {
		t.Skipf("%s is not installed (Debian package qemu-system-common)", virtiofsdPath)
	}
	dir := t.TempDir()
	share := filepath.Join(dir, "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "fs.sock")
	args := []string{"--socket-path=" + sock, "-o", "source=" + share}
	if os.Getuid() != 0 {
		t.Skip("virtiofsd needs root for its sandbox")
	}
	opt := daemontest.Options{Name: "virtiofsd", Socket: sock, Kill: true, Timeout: 10 * time.Second}
	return daemontest.Start(t, opt, append([]string{virtiofsdPath}, args...)...).Socket
}

// TestVirtiofsd negotiates with the C virtiofsd, sets up its hiprio and
// request queues, and sends FUSE_INIT on the request queue.
func TestVirtiofsd(t *testing.T) {
	sock := startVirtiofsd(t)
	g, err := retryRefused(func() (*Guest, error) { return Dial(sock, Options{NumQueues: 2, QueueSize: 128}) })
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if g.Features()&vhostuser.FeatureVersion1 == 0 {
		t.Fatalf("VIRTIO_F_VERSION_1 not negotiated: %#x", g.Features())
	}
	if g.Negotiated.ProtocolFeatures&vhostuser.ProtocolMQ != 0 && g.Negotiated.MaxQueues < 2 {
		t.Fatalf("virtiofsd reports %d queues", g.Negotiated.MaxQueues)
	}

	// FUSE_INIT: fuse_in_header (40 bytes) + fuse_init_in (16 bytes,
	// protocol 7.31); reply fuse_out_header (16) + fuse_init_out (64).
	const fuseInit = 26
	in, err := g.Mem.Alloc(56, 64)
	if err != nil {
		t.Fatal(err)
	}
	out, err := g.Mem.Alloc(80, 64)
	if err != nil {
		t.Fatal(err)
	}
	inb, _ := g.Mem.Bytes(in, 56)
	binary.LittleEndian.PutUint32(inb[0:], 56)
	binary.LittleEndian.PutUint32(inb[4:], fuseInit)
	binary.LittleEndian.PutUint64(inb[8:], 1) // unique
	binary.LittleEndian.PutUint32(inb[40:], 7)
	binary.LittleEndian.PutUint32(inb[44:], 31)
	binary.LittleEndian.PutUint32(inb[48:], 128<<10)
	req := g.Rings[1]
	if _, err := req.Post([]Segment{{Addr: in, Len: 56}, {Addr: out, Len: 80, Writable: true}}, "init"); err != nil {
		t.Fatal(err)
	}
	if _, err := req.Kick(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done, err := req.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(done) != 1 || done[0].Token != "init" {
		t.Fatalf("completions %+v", done)
	}
	outb, _ := g.Mem.Bytes(out, 80)
	olen := binary.LittleEndian.Uint32(outb[0:])
	errno := int32(binary.LittleEndian.Uint32(outb[4:]))
	unique := binary.LittleEndian.Uint64(outb[8:])
	major := binary.LittleEndian.Uint32(outb[16:])
	if errno != 0 || unique != 1 || major != 7 || olen < 24 || done[0].Len != olen {
		t.Fatalf("FUSE_INIT reply: len %d (used %d) error %d unique %d major %d", olen, done[0].Len, errno, unique, major)
	}
	// Stop the request queue: virtiofsd reports the next available index.
	base, err := g.StopQueue(1)
	if err != nil {
		t.Fatal(err)
	}
	if base != 1 {
		t.Fatalf("GET_VRING_BASE = %d after one request, want 1", base)
	}
}
