package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// startup times exec to a listening socket: krun-core serve --disk on a raw
// image (sandboxed plugin, the default) against qemu-storage-daemon
// exporting the same image. The socket's name appearing in its directory
// (inotify) ends the measurement: krun-core serve renames a socket that
// already listens into place, qemu-storage-daemon binds it and listens
// next. Each side starts Starts times per round, alternating; a round's
// figure is the median of its starts.
func (e *benchEnv) startup(ctx context.Context) ([]*benchFigure, error) {
	img := filepath.Join(e.cfg.Dir, "startup.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		return nil, err
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		return nil, err
	}
	defer os.Remove(img)
	sock := e.sockPath("start.sock")
	argv := map[string][]string{
		sideKrun: {e.cfg.Self, "serve", "--socket", sock, "--disk", "path=" + img + ",format=raw"},
		sideQSD: {e.qsd, "--blockdev", "driver=file,node-name=f0,filename=" + qemuEscape(img),
			"--blockdev", "driver=raw,node-name=d0,file=f0",
			"--export", "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=" + qemuEscape(sock) + ",writable=on"},
	}
	sides := []string{sideKrun}
	if e.qsd != "" {
		sides = append(sides, sideQSD)
	}
	set := newFigureSet("startup", sideQSD)
	for r := range e.cfg.Rounds {
		load := e.sampleLoad()
		times := map[string][]float64{}
		for i := range e.cfg.Starts {
			for _, side := range order(sides, r+i) {
				d, err := timeStart(ctx, sock, argv[side])
				if err != nil {
					return nil, fmt.Errorf("%s: %w", side, err)
				}
				times[side] = append(times[side], float64(d)/float64(time.Millisecond))
			}
		}
		for _, side := range sides {
			set.add("serve --disk raw", "ms", false, side, median(times[side]), 0)
		}
		e.progress("startup: round %d of %d done (load %.2f)", r+1, e.cfg.Rounds, load)
	}
	return set.list, nil
}

// timeStart starts argv, waits for the socket's name to appear, stops the
// process (SIGTERM) and waits for it to exit; it returns the time from
// just before the fork to the socket.
func timeStart(ctx context.Context, sock string, argv []string) (time.Duration, error) {
	os.Remove(sock)
	in, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return 0, fmt.Errorf("inotify: %w", err)
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, filepath.Dir(sock), unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		return 0, fmt.Errorf("inotify %s: %w", filepath.Dir(sock), err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	out := &tailWriter{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		os.Remove(sock)
	}()
	name := filepath.Base(sock)
	deadline := start.Add(30 * time.Second)
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(in, buf)
		if err == nil {
			if inotifyHas(buf[:n], name) {
				return time.Since(start), nil
			}
			continue
		}
		if err != unix.EAGAIN && err != unix.EINTR {
			return 0, fmt.Errorf("inotify: %w", err)
		}
		select {
		case <-exited:
			return 0, fmt.Errorf("%s exited before listening: %s", filepath.Base(argv[0]), out.last())
		case <-ctx.Done():
			return 0, ctx.Err()
		default:
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%s: no socket after 30 s", filepath.Base(argv[0]))
		}
		// Sleep in poll rather than spin: the machine may have few CPUs.
		pfd := []unix.PollFd{{Fd: int32(in), Events: unix.POLLIN}}
		unix.Poll(pfd, 10)
	}
}

// inotifyHas reports whether the events in b name name. An event is a
// 16-byte header (wd, mask, cookie, len; native byte order, little-endian
// on every architecture krun-core builds for) and len bytes of name.
func inotifyHas(b []byte, name string) bool {
	const hdr = unix.SizeofInotifyEvent
	for len(b) >= hdr {
		end := hdr + int(binary.LittleEndian.Uint32(b[12:16]))
		if end > len(b) {
			return false
		}
		if unix.ByteSliceToString(b[hdr:end]) == name {
			return true
		}
		b = b[end:]
	}
	return false
}
