package blk_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/vmtest"
)

// The guest side of every disk test. disk_test writes known patterns at the
// first sector, the middle and the last sector with O_DIRECT, drops the page
// cache and reads them back with O_DIRECT; checks how the surrounding
// clusters read (the base content — zeroes or the backing file — must show
// through around a partial write); makes an ext2 file system on the first
// half, writes files, remounts after dropping caches and compares them; and
// finally re-reads the patterns.
const guestFunctions = `
fail() { e2e_fail "$*"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
rd() { # dev sector count out
	dd if=$1 of=$4 bs=512 skip=$2 count=$3 iflag=direct status=none 2>/tmp/dd.err || fail "O_DIRECT read of $1 at sector $2: $(cat /tmp/dd.err)"
}
wr() { # file dev sector
	dd if=$1 of=$2 bs=512 seek=$3 oflag=direct conv=notrunc status=none 2>/tmp/dd.err || fail "O_DIRECT write of $2 at sector $3: $(cat /tmp/dd.err)"
}
same() { # file expected what
	cmp -s $1 $2 || fail "$3 reads back wrong"
}
check_size() { # name sectors
	[ -b /dev/$1 ] || fail "no /dev/$1"
	[ "$(cat /sys/block/$1/size)" = "$2" ] || fail "/dev/$1 has $(cat /sys/block/$1/size) sectors, want $2"
}
check_patterns() { # dev sectors
	rd $1 0 1 /tmp/r; same /tmp/r /pat/first "$1 first sector"
	rd $1 $(($2/2)) 8 /tmp/r; same /tmp/r /pat/mid "$1 middle"
	rd $1 $(($2-1)) 1 /tmp/r; same /tmp/r /pat/last "$1 last sector"
}
disk_test() { # name sectors label
	d=/dev/$1; n=$2; p=/pat/$3
	check_size $1 $n
	[ "$(cat /sys/block/$1/ro)" = 0 ] || fail "$d is read-only"
	rd $d $((n*3/4)) 128 /tmp/r; same /tmp/r $p/probe "$d untouched region before writes"
	wr /pat/first $d 0
	wr /pat/mid $d $((n/2))
	wr /pat/last $d $((n-1))
	drop
	check_patterns $d $n
	rd $d 0 128 /tmp/r; same /tmp/r $p/c0 "$d cluster around the first sector"
	rd $d $((n/2)) 128 /tmp/r; same /tmp/r $p/cmid "$d cluster around the middle"
	rd $d $((n*3/4)) 128 /tmp/r; same /tmp/r $p/probe "$d untouched region after writes"
	dd if=$d of=/tmp/r bs=512 skip=$n count=1 iflag=direct status=none 2>/dev/null || true
	[ ! -s /tmp/r ] || fail "$d: a read past the end returned data"
	ds=$((n*5/8/128))
	dd if=/pat/blob of=$d bs=64k seek=$ds oflag=direct conv=notrunc status=none || fail "write 1 MiB to $d"
	drop
	dd if=$d of=/tmp/r bs=64k skip=$ds count=16 iflag=direct status=none || fail "read 1 MiB from $d"
	same /tmp/r /pat/blob "$d 1 MiB block"
	blkdiscard -o $((ds*65536)) -l 1048576 $d 2>/tmp/bd.err || fail "blkdiscard $d: $(cat /tmp/bd.err)"
	drop
	dd if=$d of=/tmp/r bs=64k skip=$ds count=16 iflag=direct status=none || fail "read 1 MiB from $d"
	head -c 1048576 /dev/zero > /tmp/z
	same /tmp/r /tmp/z "$d discarded MiB (not zero)"
	mke2fs $d $((n/4)) >/dev/null 2>/tmp/mk.err || fail "mke2fs $d: $(cat /tmp/mk.err)"
	mount -t ext2 $d /mnt || fail "mount $d"
	mkdir /mnt/dir
	cp /pat/f1 /mnt/f1
	cp /pat/f2 /mnt/dir/f2
	umount /mnt
	drop
	mount -t ext2 -o ro $d /mnt || fail "remount $d"
	same /mnt/f1 /pat/f1 "$d file f1"
	same /mnt/dir/f2 /pat/f2 "$d file dir/f2"
	umount /mnt
	drop
	check_patterns $d $n
	echo "disk $d ok"
}
ro_test() { # name sectors
	d=/dev/$1
	check_size $1 $2
	[ "$(cat /sys/block/$1/ro)" = 1 ] || fail "$d is not read-only in the guest"
	rd $d 0 8 /tmp/r; same /tmp/r /pat/ro "$d (read-only)"
	if dd if=/pat/first of=$d bs=512 count=1 oflag=direct conv=notrunc status=none 2>/dev/null; then fail "a write to read-only $d succeeded"; fi
	if mke2fs $d >/dev/null 2>&1; then fail "mke2fs on read-only $d succeeded"; fi
	echo "disk $d read-only ok"
}
raw_is_raw() { # name sectors
	check_size $1 $2
	rd /dev/$1 0 1 /tmp/r; same /tmp/r /pat/first "raw /dev/$1 sector 0 (a qcow2 header written by the last run)"
	echo "disk /dev/$1 raw-is-raw ok"
}
`

// fixtures are the host-generated patterns the guest writes and expects.
type fixtures struct {
	first []byte // a real qcow2 header: raw must stay raw
	mid   []byte // 4 KiB
	last  []byte
	f1    []byte // file contents
	f2    []byte
	ro    []byte // content of the read-only disk's first 4 KiB
	blob  []byte // 1 MiB the guest writes, then discards
}

func newFixtures(t *testing.T, qemuImg string) *fixtures {
	hdrImg := filepath.Join(t.TempDir(), "hdr.qcow2")
	run(t, qemuImg, "create", "-q", "-f", "qcow2", hdrImg, "1T")
	hdr, err := os.ReadFile(hdrImg)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(hdr, []byte("QFI\xfb")) {
		t.Fatal("qemu-img did not write a qcow2 header")
	}
	rng := rand.New(rand.NewPCG(42, 4242))
	rnd := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	f := &fixtures{
		first: hdr[:512],
		mid:   bytes.Repeat([]byte("krun-e2e middle\n"), 4096/16),
		last:  bytes.Repeat([]byte("krun-e2e  last\n."), 512/16),
		f1:    rnd(300 << 10),
		f2:    rnd(5000),
		ro:    rnd(4096),
		blob:  rnd(1 << 20),
	}
	return f
}

func (f *fixtures) add(ib *vmtest.Initramfs) {
	ib.AddBytes("/pat/first", f.first, 0o644)
	ib.AddBytes("/pat/mid", f.mid, 0o644)
	ib.AddBytes("/pat/last", f.last, 0o644)
	ib.AddBytes("/pat/f1", f.f1, 0o644)
	ib.AddBytes("/pat/f2", f.f2, 0o644)
	ib.AddBytes("/pat/ro", f.ro, 0o644)
	ib.AddBytes("/pat/blob", f.blob, 0o644)
}

// testDisk is one disk the guest runs disk_test on.
type testDisk struct {
	label   string // /pat/<label>
	image   string
	format  string // raw or qcow2
	spec    string // --disk
	sectors int64
	base    []byte // content before the guest ran (zeroes or the backing's)
}

func (d *testDisk) size() int64 { return d.sectors * 512 }

// expected is the disk content around the patterns, as the guest must read it
// after writing them: the base content with the patterns on top.
func (d *testDisk) expected(f *fixtures) (c0, cmid, probe []byte) {
	const cl = 64 << 10
	img := func(off int64) []byte { return bytes.Clone(d.base[off : off+cl]) }
	c0 = img(0)
	copy(c0, f.first)
	mid := d.size() / 2
	cmid = img(mid)
	copy(cmid, f.mid)
	probe = img(d.size() * 3 / 4)
	return c0, cmid, probe
}

func (d *testDisk) addExpected(ib *vmtest.Initramfs, f *fixtures) {
	c0, cmid, probe := d.expected(f)
	ib.AddBytes("/pat/"+d.label+"/c0", c0, 0o644)
	ib.AddBytes("/pat/"+d.label+"/cmid", cmid, 0o644)
	ib.AddBytes("/pat/"+d.label+"/probe", probe, 0o644)
}

// checkRaw checks a raw image of d's virtual content after the guest ran:
// the patterns, the untouched region, e2fsck and the files (via debugfs).
func checkRaw(t *testing.T, d *testDisk, f *fixtures, rawPath string) {
	t.Helper()
	img, err := os.ReadFile(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(img)) != d.size() {
		t.Fatalf("%s: %d bytes, want %d", d.label, len(img), d.size())
	}
	mid := d.size() / 2
	for _, c := range []struct {
		what string
		off  int64
		want []byte
	}{
		{"first sector", 0, f.first},
		{"middle", mid, f.mid},
		{"last sector", d.size() - 512, f.last},
		{"untouched region", d.size() * 3 / 4, d.base[d.size()*3/4 : d.size()*3/4+64<<10]},
		{"after the middle pattern", mid + 4096, d.base[mid+4096 : mid+64<<10]},
		{"discarded MiB", d.size() * 5 / 8, make([]byte, 1<<20)},
	} {
		if !bytes.Equal(img[c.off:c.off+int64(len(c.want))], c.want) {
			t.Errorf("%s: host read of the %s differs", d.label, c.what)
		}
	}
	out, err := runErr(tool(t, "e2fsck"), "-fn", rawPath)
	if err != nil {
		t.Errorf("%s: e2fsck -fn: %v\n%s", d.label, err, out)
	}
	dir := t.TempDir()
	for name, want := range map[string][]byte{"/f1": f.f1, "/dir/f2": f.f2} {
		dst := filepath.Join(dir, filepath.Base(name))
		run(t, tool(t, "debugfs"), "-R", "dump "+name+" "+dst, rawPath)
		got, err := os.ReadFile(dst)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: file %s as debugfs reads it differs from what the guest wrote (%v)", d.label, name, err)
		}
	}
}

func runErr(name string, args ...string) ([]byte, error) {
	return exec.Command(name, args...).CombinedOutput()
}

func newRawImage(t *testing.T, dir, name string, size int64, content []byte) string {
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// bootGuest boots a guest with one vhost-user-blk-pci device per socket,
// each with as many request queues as the guest has vCPUs.
func bootGuest(t *testing.T, a *vmtest.Assets, ib *vmtest.Initramfs, cpus int, sockets []string) *vmtest.Result {
	ib.AddModules(a.Kernel, "virtio_pci", "virtio_blk", "ext4")
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib, Timeout: 6 * time.Minute, CPUs: cpus})
	for _, s := range sockets {
		vm.AddVhostUserBlk(s, "num-queues="+strconv.Itoa(cpus))
	}
	return vm.Run()
}

// TestRaw runs the guest disk test on a raw image served by
// krun-plugin-blk-raw, next to a read-only raw disk, then checks the image
// from the host. A second boot serves the same image with format=raw again:
// the qcow2 header the guest wrote into sector 0 is served as plain bytes.
func TestRaw(t *testing.T) {
	a := vmtest.Require(t)
	qemuImg := tool(t, "qemu-img")
	tool(t, "e2fsck")
	tool(t, "debugfs")
	f := newFixtures(t, qemuImg)
	dir := t.TempDir()

	const sectors = 64 << 20 / 512
	rw := &testDisk{label: "raw", format: "raw", sectors: sectors, base: make([]byte, sectors*512)}
	rw.image = newRawImage(t, dir, "rw.raw", rw.size(), nil)
	rw.spec = "path=" + rw.image + ",format=raw"
	roImg := newRawImage(t, dir, "ro.raw", 8<<20, f.ro)
	roBefore, _ := os.ReadFile(roImg)

	s1 := serve(t, rw.spec)
	s2 := serve(t, "path="+roImg+",format=raw,readonly=on")
	ib := a.NewInitramfs()
	f.add(ib)
	rw.addExpected(ib, f)
	// Two vCPUs and two request queues: the guest's block layer spreads
	// requests over both.
	ib.SetInit(guestFunctions + fmt.Sprintf(`
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || fail "vda has $(ls /sys/block/vda/mq | wc -l) request queues, want 2"
for cpu in 1 2; do # CPU masks: each CPU submits through its own queue
	taskset $cpu dd if=/pat/blob of=/dev/vda bs=64k seek=$((cpu*16)) count=16 oflag=direct conv=notrunc status=none || fail "write from CPU mask $cpu"
done
drop
for cpu in 2 1; do
	taskset $cpu dd if=/dev/vda of=/tmp/r bs=64k skip=$((cpu*16)) count=16 iflag=direct status=none || fail "read from CPU mask $cpu"
	same /tmp/r /pat/blob "vda MiB $cpu written from CPU mask $cpu"
done
disk_test vda %d raw
ro_test vdb %d
`, rw.sectors, 8<<20/512))
	bootGuest(t, a, ib, 2, []string{s1.Socket, s2.Socket})
	s1.Stop()
	s2.Stop()

	checkRaw(t, rw, f, rw.image)
	if roAfter, _ := os.ReadFile(roImg); !bytes.Equal(roAfter, roBefore) {
		t.Error("the read-only image changed")
	}
	if st, _ := os.Stat(rw.image); st.Size() != rw.size() {
		t.Errorf("raw image size changed to %d", st.Size())
	}

	// Raw is raw across runs: sector 0 now holds a qcow2 header, and the
	// image is still served as the raw bytes of its file.
	s3 := serve(t, rw.spec)
	ib2 := a.NewInitramfs()
	f.add(ib2)
	ib2.SetInit(guestFunctions + fmt.Sprintf("raw_is_raw vda %d\n", rw.sectors))
	bootGuest(t, a, ib2, 1, []string{s3.Socket})
	s3.Stop()
	if hdr, _ := os.ReadFile(rw.image); !bytes.Equal(hdr[:512], f.first) {
		t.Error("raw image's sector 0 lost the bytes the guest wrote")
	}
}

// backingContent is a compressible pattern with holes, so that a qcow2
// conversion has compressed clusters and unallocated ones.
func backingContent(size int64) []byte {
	b := make([]byte, size)
	for off := int64(0); off < size; off += 4096 {
		if (off>>20)%8 == 5 { // every eighth MiB stays a hole
			continue
		}
		tag := fmt.Sprintf("backing %08x\n", off)
		for i := off; i < off+4096; i += int64(len(tag)) {
			copy(b[i:off+4096], tag)
		}
	}
	return b
}

// TestQCOW2 runs the same guest disk test on qcow2 images served by
// krun-plugin-blk-qcow2 — empty, over a raw backing file, over a qcow2
// backing file holding compressed clusters, and with extended L2 entries
// over a raw backing file — then checks each with qemu-img check, compares
// QEMU's reading of the image with what the plugin serves (qemu-img
// compare), and runs the host checks on QEMU's conversion to raw.
func TestQCOW2(t *testing.T) {
	a := vmtest.Require(t)
	qemuImg := tool(t, "qemu-img")
	tool(t, "e2fsck")
	tool(t, "debugfs")
	f := newFixtures(t, qemuImg)
	dir := t.TempDir()

	var disks []*testDisk
	mk := func(label string, mib int64, backing string, backingFmt string, base []byte, opts string) {
		d := &testDisk{label: label, format: "qcow2", sectors: mib << 20 / 512}
		d.image = filepath.Join(dir, label+".qcow2")
		args := []string{"create", "-q", "-f", "qcow2"}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		d.spec = "path=" + d.image + ",format=qcow2"
		if backing != "" {
			args = append(args, "-b", backing, "-F", backingFmt)
			d.spec += ",backing=" + backing + ",backing-format=" + backingFmt
		}
		run(t, qemuImg, append(args, d.image, strconv.FormatInt(d.size(), 10))...)
		d.base = base
		if d.base == nil {
			d.base = make([]byte, d.size())
		}
		disks = append(disks, d)
	}
	mk("empty", 48, "", "", nil, "")

	bk1 := backingContent(56 << 20)
	mk("rawbacking", 56, newRawImage(t, dir, "bk1.raw", 56<<20, bk1), "raw", bk1, "")

	bk2 := backingContent(72 << 20)
	bk2raw := newRawImage(t, dir, "bk2.raw", 72<<20, bk2)
	bk2q := filepath.Join(dir, "bk2.qcow2")
	run(t, qemuImg, "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", bk2raw, bk2q)
	if out := string(run(t, qemuImg, "check", bk2q)); !regexp.MustCompile(`[1-9][0-9.]*% compressed`).MatchString(out) {
		t.Fatalf("backing file has no compressed clusters:\n%s", out)
	}
	mk("compressedbacking", 72, bk2q, "qcow2", bk2, "")

	bk3 := backingContent(80 << 20)
	mk("extl2", 80, newRawImage(t, dir, "bk3.raw", 80<<20, bk3), "raw", bk3, "extended_l2=on")

	ib := a.NewInitramfs()
	f.add(ib)
	var script strings.Builder
	script.WriteString(guestFunctions)
	var sockets []string
	var servers []*server
	for i, d := range disks {
		d.addExpected(ib, f)
		s := serve(t, d.spec)
		servers = append(servers, s)
		sockets = append(sockets, s.Socket)
		fmt.Fprintf(&script, "disk_test vd%c %d %s\n", 'a'+i, d.sectors, d.label)
	}
	ib.SetInit(script.String())
	bootGuest(t, a, ib, 1, sockets)
	for _, s := range servers {
		s.Stop()
	}

	for _, d := range disks {
		t.Run(d.label, func(t *testing.T) {
			out, err := runErr(qemuImg, "check", "-f", "qcow2", d.image)
			if err != nil || !strings.Contains(string(out), "No errors were found") {
				t.Errorf("qemu-img check: %v\n%s", err, out)
			}
			// What krun-core serves equals what QEMU reads.
			s := serve(t, d.spec+",readonly=on")
			served := filepath.Join(t.TempDir(), "served.raw")
			dump(t, s.Socket, served)
			s.Stop()
			out, err = runErr(qemuImg, "compare", "-f", "qcow2", "-F", "raw", d.image, served)
			if err != nil {
				t.Errorf("qemu-img compare with the served content: %v\n%s", err, out)
			}
			conv := filepath.Join(t.TempDir(), "conv.raw")
			run(t, qemuImg, "convert", "-f", "qcow2", "-O", "raw", d.image, conv)
			checkRaw(t, d, f, conv)
		})
	}
}

// TestLongChains serves a raw and a qcow2 disk to QEMU's vhost-user-blk-pci
// with its default ring of 128 descriptors, and a third (raw) with
// queue-size=1024, QEMU's largest ring, which qemu-storage-daemon accepts,
// and num-queues=12, which its --disk offers with queues=12.
// QEMU reads the device's configuration before it sets a ring size, so
// seg_max (254) cannot follow the ring, and Linux builds requests of that
// many data segments: on the ring of 128 their indirect tables (256
// entries) are longer than the ring. blkverify
// writes and verifies 1 MiB requests from buffers whose pages it faulted
// in backwards, so that each page is a segment of its own; every one must
// be served (no malformed request, no I/O error, every byte right).
func TestLongChains(t *testing.T) {
	a := vmtest.Require(t)
	qemuImg := tool(t, "qemu-img")
	dir := t.TempDir()
	const size = 16 << 20
	raw := newRawImage(t, dir, "long.raw", size, nil)
	q := filepath.Join(dir, "long.qcow2")
	run(t, qemuImg, "create", "-q", "-f", "qcow2", q, strconv.Itoa(size))
	big := newRawImage(t, dir, "big-ring.raw", size, nil)
	servers := []*server{
		serve(t, "path="+raw+",format=raw", "--log-level", "debug"),
		serve(t, "path="+q+",format=qcow2", "--log-level", "debug"),
		serve(t, "path="+big+",format=raw,queues=12", "--log-level", "debug"),
	}

	ib := a.NewInitramfs()
	ib.AddFile("/bin/blkverify", vmtest.BuildStatic(t, "github.com/krun-core/krun-core/internal/vmtest/blkverify"), 0o755)
	ib.AddModules(a.Kernel, "virtio_pci", "virtio_blk")
	ib.SetInit(fmt.Sprintf(`
for d in vda vdb vdc; do
	[ -b /dev/$d ] || e2e_fail "no /dev/$d"
	segs=$(cat /sys/block/$d/queue/max_segments)
	[ "$segs" -gt 128 ] || e2e_fail "$d takes $segs segments a request: this test needs more than the ring's 128"
done
blkverify -size %d -chunk 1048576 -depth 2 -passes 3 -scatter /dev/vda /dev/vdb /dev/vdc || e2e_fail "blkverify failed"
if dmesg | grep -iE 'I/O error|blk_update_request|critical'; then
	e2e_fail "the kernel logged I/O errors"
fi
echo "long chains ok"
`, size))
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib, Timeout: 6 * time.Minute})
	vm.AddVhostUserBlk(servers[0].Socket)
	vm.AddVhostUserBlk(servers[1].Socket)
	// More request queues than the plugin's default of 8 (QEMU asks for
	// one per vCPU unless told): queues= offers them.
	vm.AddVhostUserBlk(servers[2].Socket, "queue-size=1024", "num-queues=12")
	r := vm.Run()
	if !strings.Contains(r.Console, "long chains ok") {
		t.Fatal("the guest did not finish its check")
	}
	for i, s := range servers {
		s.Stop()
		if strings.Contains(s.Out.String(), "malformed") {
			t.Errorf("%s counted a malformed request:\n%s", s.Socket, s.Out)
		}
		// The disks on rings of 128 got what the test is about (the
		// back-end says so once per ring): the pages of a request did
		// not happen to merge into few segments.
		if long := strings.Contains(s.Out.String(), "chain longer than the ring"); i < 2 && !long {
			t.Errorf("%s never got a chain longer than its ring of 128:\n%s", s.Socket, s.Out)
		}
	}
	out, err := runErr(qemuImg, "check", "-f", "qcow2", q)
	if err != nil || !strings.Contains(string(out), "No errors were found") {
		t.Errorf("qemu-img check: %v\n%s", err, out)
	}
}
