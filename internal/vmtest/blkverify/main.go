// Command blkverify is a guest-side tool of the end-to-end tests: a
// write-then-verify loop on block devices with O_DIRECT. Each pass writes
// every chunk of each device in a random order, several at a time, with a
// pattern unique to the pass, the device and the sector (see word), then
// reads every chunk back and checks it. It loops until the stop file exists
// (checked after each pass), and exits 0 only if every pass verified; any
// I/O error or wrong byte ends the device's loop at once with one line
// saying where (the other devices go on until stopped), and blkverify then
// exits with status 1.
//
//	blkverify [-size BYTES] [-chunk BYTES] [-depth N] [-stop FILE] [-passes N] [-scatter] DEVICE...
//
// -scatter faults the pages of each request buffer in from the last to the
// first, so that they are rarely physically contiguous: a request then
// carries one segment per page (up to the device's seg_max), the longest
// descriptor chains a Linux driver builds.
//
// Lines: "BLKVERIFY start", "BLKVERIFY DEV pass N ok (T)", "BLKVERIFY FAIL
// DEV: ...", "BLKVERIFY done passes=N".
package main

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	size := flag.Int64("size", 16<<20, "bytes of each device to exercise")
	chunk := flag.Int("chunk", 64<<10, "bytes per request (a multiple of 4096)")
	depth := flag.Int("depth", 4, "requests in flight per device")
	stop := flag.String("stop", "", "stop after the pass during which this file appeared")
	passes := flag.Int("passes", 0, "stop after this many passes (0: only the stop file stops)")
	scatter := flag.Bool("scatter", false, "fault request buffers in from their last page, so that each page is a segment of its own")
	flag.Parse()
	if flag.NArg() == 0 || *chunk <= 0 || *chunk%4096 != 0 || *size < int64(*chunk) || *depth < 1 {
		fmt.Fprintln(os.Stderr, "usage: blkverify [-size BYTES] [-chunk BYTES] [-depth N] [-stop FILE] [-passes N] [-scatter] DEVICE...")
		os.Exit(2)
	}
	fmt.Println("BLKVERIFY start")
	var wg sync.WaitGroup
	results := make([]int, flag.NArg())
	var bad atomic.Bool
	for i, dev := range flag.Args() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := loop(uint64(i), dev, *size, *chunk, *depth, *stop, *passes, *scatter)
			results[i] = n
			if err != nil {
				// Now, not when every device is done: a test waiting
				// for this device's next pass must see why it will
				// never come.
				fmt.Printf("BLKVERIFY FAIL %s: %v\n", dev, err)
				bad.Store(true)
			}
		}()
	}
	wg.Wait()
	if bad.Load() {
		os.Exit(1)
	}
	fmt.Printf("BLKVERIFY done passes=%v\n", results)
}

// word names the pass, the device and an offset: the pattern starts every
// 512-byte sector with the word of its offset and fills the rest with
// bytes of the pass and device (cheap to make and compare even in an
// emulated guest, so the device's share of the time stays large), so a
// sector that is stale (another pass), misplaced (another offset or
// device) or torn reads back wrong.
func word(pass, dev, off uint64) uint64 { return pass<<48 | dev<<40 | off>>3 }

// fill writes the pattern of [off, off+len(b)) into b; filler is the
// pass's and device's 504 bytes.
func fill(b []byte, pass, dev, off uint64, filler []byte) {
	for i := 0; i < len(b); i += 512 {
		binary.LittleEndian.PutUint64(b[i:], word(pass, dev, off+uint64(i)))
		copy(b[i+8:i+512], filler)
	}
}

// filler is the 504 bytes after each sector's word in a pass.
func filler(pass, dev uint64) []byte {
	f := make([]byte, 504)
	for i := range f {
		f[i] = byte(pass*31 + dev*7 + uint64(i)*13)
	}
	return f
}

// loop runs passes on one device until stopped; it returns the passes that
// verified.
func loop(dev uint64, path string, size int64, chunk, depth int, stop string, maxPasses int, scatter bool) (int, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open: %w", err)
	}
	defer unix.Close(fd)
	n := int(size / int64(chunk))
	bufs := make([][]byte, depth)
	want := make([][]byte, depth)
	for i := range bufs {
		// O_DIRECT wants aligned buffers: a mapping is page aligned.
		if bufs[i], err = unix.Mmap(-1, 0, chunk, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE); err != nil {
			return 0, err
		}
		if scatter {
			for off := chunk - 4096; off >= 0; off -= 4096 {
				bufs[i][off] = 1
			}
		}
		want[i] = make([]byte, chunk)
	}
	rng := rand.New(rand.NewPCG(dev, uint64(time.Now().UnixNano())))
	for pass := 1; ; pass++ {
		start := time.Now()
		order := rng.Perm(n)
		fl := filler(uint64(pass), dev)
		if err := run(order, depth, func(w, c int) error {
			b := bufs[w]
			off := uint64(c) * uint64(chunk)
			fill(b, uint64(pass), dev, off, fl)
			return pwriteAll(fd, b, int64(off))
		}); err != nil {
			return pass - 1, fmt.Errorf("pass %d: write: %w", pass, err)
		}
		if err := run(rng.Perm(n), depth, func(w, c int) error {
			b := bufs[w]
			off := uint64(c) * uint64(chunk)
			// Poisoned first: a read the device dropped must not pass
			// on what this buffer held before.
			for i := range b {
				b[i] = 0xa5
			}
			if err := preadAll(fd, b, int64(off)); err != nil {
				return err
			}
			exp := want[w]
			fill(exp, uint64(pass), dev, off, fl)
			if bytes.Equal(b, exp) {
				return nil
			}
			for i := 0; i < chunk; i += 512 {
				if !bytes.Equal(b[i:i+512], exp[i:i+512]) {
					got := binary.LittleEndian.Uint64(b[i:])
					return fmt.Errorf("sector at byte %d reads wrong: word %#016x (pass %d, device %d, offset %d), want pass %d",
						off+uint64(i), got, got>>48, got>>40&0xff, (got&(1<<40-1))<<3, pass)
				}
			}
			return nil
		}); err != nil {
			return pass - 1, fmt.Errorf("pass %d: verify: %w", pass, err)
		}
		fmt.Printf("BLKVERIFY %s pass %d ok (%v)\n", path, pass, time.Since(start).Round(time.Millisecond))
		if maxPasses > 0 && pass >= maxPasses {
			return pass, nil
		}
		if stop != "" {
			if _, err := os.Stat(stop); err == nil {
				return pass, nil
			}
		}
	}
}

// run calls f(worker, chunk) for every chunk of order, depth at a time.
func run(order []int, depth int, f func(w, c int) error) error {
	work := make(chan int)
	errs := make(chan error, depth)
	var wg sync.WaitGroup
	for w := range depth {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range work {
				if err := f(w, c); err != nil {
					errs <- err
					for range work {
					}
					return
				}
			}
		}()
	}
	for _, c := range order {
		select {
		case work <- c:
		case err := <-errs:
			close(work)
			wg.Wait()
			return err
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

func pwriteAll(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		if err != nil {
			return fmt.Errorf("pwrite at %d: %w", off, err)
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

func preadAll(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pread(fd, b, off)
		if err != nil {
			return fmt.Errorf("pread at %d: %w", off, err)
		}
		if n == 0 {
			return fmt.Errorf("pread at %d: end of device", off)
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}
