// Package blkstamp stamps disk blocks for tests that write through a
// virtio-blk device while its plugin is killed: every 512-byte sector
// carries its own sector number, a generation and bytes derived from both,
// so that a torn, misplaced or stale sector shows, and reads an image file
// back (qcow2 through qemu-img, sharing it with the plugin that serves it).
package blkstamp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// magic marks a stamped sector ("krunchas").
const magic = 0x6b72756e63686173

// Stamp fills p (whole sectors, the first at sector) with generation gen.
func Stamp(p []byte, sector, gen uint64) {
	for s := 0; s < len(p)/512; s++ {
		q := p[s*512 : (s+1)*512]
		sec := sector + uint64(s)
		binary.LittleEndian.PutUint64(q[0:], sec)
		binary.LittleEndian.PutUint64(q[8:], gen)
		binary.LittleEndian.PutUint64(q[16:], magic)
		for i := 24; i < 512; i++ {
			q[i] = byte(gen*7 + sec + uint64(i))
		}
	}
}

// Gen returns the generation p (whole sectors, the first at sector)
// holds: 0 for zeros (never written), else the one every sector carries,
// or an error naming the first sector that is not that generation's.
func Gen(p []byte, sector uint64) (uint64, error) {
	zero := true
	for _, b := range p {
		if b != 0 {
			zero = false
			break
		}
	}
	if zero {
		return 0, nil
	}
	gen := binary.LittleEndian.Uint64(p[8:])
	want := make([]byte, len(p))
	Stamp(want, sector, gen)
	for s := 0; s < len(p)/512; s++ {
		if string(p[s*512:(s+1)*512]) != string(want[s*512:(s+1)*512]) {
			return 0, fmt.Errorf("sector %d: stamp sector %d generation %d magic %#x, not generation %d's",
				sector+uint64(s), binary.LittleEndian.Uint64(p[s*512:]), binary.LittleEndian.Uint64(p[s*512+8:]),
				binary.LittleEndian.Uint64(p[s*512+16:]), gen)
		}
	}
	return gen, nil
}

// OpenImage opens the guest-visible contents of img: a raw image itself,
// a qcow2 one converted to a raw file in dir by qemu-img (with -U: the
// plugin serving it may hold its lock). Close removes the copy.
func OpenImage(dir, img, format string) (*Image, error) {
	if format == "raw" {
		f, err := os.Open(img)
		if err != nil {
			return nil, fmt.Errorf("open image: %w", err)
		}
		return &Image{File: f}, nil
	}
	raw := filepath.Join(dir, "blkstamp-check.raw")
	os.Remove(raw)
	if out, err := exec.Command("qemu-img", "convert", "-U", "-f", format, "-O", "raw", img, raw).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("qemu-img convert: %v\n%s", err, out)
	}
	f, err := os.Open(raw)
	if err != nil {
		os.Remove(raw)
		return nil, fmt.Errorf("open converted image: %w", err)
	}
	return &Image{File: f, remove: raw}, nil
}

// Image is an image's contents opened by OpenImage.
type Image struct {
	*os.File
	remove string
}

// Gen returns the generation of n bytes at sector.
func (im *Image) Gen(sector uint64, n int) (uint64, error) {
	p := make([]byte, n)
	if _, err := im.ReadAt(p, int64(sector)*512); err != nil {
		return 0, fmt.Errorf("read sector %d: %w", sector, err)
	}
	return Gen(p, sector)
}

// Close closes the image and removes a converted copy.
func (im *Image) Close() error {
	err := im.File.Close()
	if im.remove != "" {
		os.Remove(im.remove)
	}
	return err
}

// FreeRange picks, with intn (a *rand.Rand's Intn), a range of blocks
// within one of slots slots of slotBlocks blocks each that no block of busy
// is in: its first block and its length. It gives up after 102 tries.
func FreeRange(intn func(int) int, busy []bool, slots, slotBlocks int) (blk, n int, err error) {
	for try := 0; ; try++ {
		slot, off := intn(slots), intn(slotBlocks)
		blk, n = slot*slotBlocks+off, 1+intn(slotBlocks-off)
		free := true
		for i := blk; i < blk+n; i++ {
			free = free && !busy[i]
		}
		if free {
			return blk, n, nil
		}
		if try > 100 {
			return 0, 0, errors.New("no free block range")
		}
	}
}
