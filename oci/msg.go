package oci

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/container"
)

// The monitor's control socket: SOCK_SEQPACKET, one JSON message each
// way per request, file descriptors (an exec's stdio) with SCM_RIGHTS.
const (
	maxMessage  = 256 << 10
	maxMsgFiles = 5
)

// Requests.
const (
	opState      = "state"       // -> Status
	opStart      = "start"       // release the command
	opSignal     = "signal"      // Signal to the command; with All to every process
	opResize     = "resize"      // Rows, Cols of the command's terminal
	opExec       = "exec"        // Exec; files stdin, stdout, stderr, status -> ExecID
	opExecSignal = "exec-signal" // ExecID, Signal
	opExecResize = "exec-resize" // ExecID, Rows, Cols
)

type request struct {
	Op     string             `json:"op"`
	Signal int                `json:"signal,omitempty"`
	All    bool               `json:"all,omitempty"`
	Rows   uint16             `json:"rows,omitempty"`
	Cols   uint16             `json:"cols,omitempty"`
	Exec   *container.Process `json:"exec,omitempty"`
	ExecID uint32             `json:"exec_id,omitempty"`
}

type reply struct {
	Error  string `json:"error,omitempty"`
	Status string `json:"status,omitempty"`
	ExecID uint32 `json:"exec_id,omitempty"`
}

// sockAddr returns an address for the socket in dir that fits sun_path
// whatever dir's length: a path through an O_PATH descriptor of dir
// (which the caller keeps open while the address is used).
func sockAddr(dir string) (addr string, dirf *os.File, err error) {
	full := filepath.Join(dir, monitorSock)
	if len(full) < 100 {
		return full, nil, nil
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("open %s: %w", dir, err)
	}
	f := os.NewFile(uintptr(fd), dir)
	return "/proc/self/fd/" + strconv.Itoa(fd) + "/" + monitorSock, f, nil
}

// listenMonitor makes the monitor's socket in dir.
func listenMonitor(dir string) (*net.UnixListener, func(), error) {
	addr, dirf, err := sockAddr(dir)
	if err != nil {
		return nil, nil, err
	}
	_ = os.Remove(filepath.Join(dir, monitorSock))
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: addr, Net: "unixpacket"})
	if err != nil {
		if dirf != nil {
			dirf.Close()
		}
		return nil, nil, fmt.Errorf("listen on %s: %w", filepath.Join(dir, monitorSock), err)
	}
	l.SetUnlinkOnClose(false)
	cleanup := func() {
		l.Close()
		_ = os.Remove(filepath.Join(dir, monitorSock))
		if dirf != nil {
			dirf.Close()
		}
	}
	return l, cleanup, nil
}

// dialMonitor connects to the control socket of the container in dir.
func dialMonitor(dir string) (*net.UnixConn, error) {
	addr, dirf, err := sockAddr(dir)
	if err != nil {
		return nil, err
	}
	if dirf != nil {
		defer dirf.Close() // the connection made, the path is not needed
	}
	conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: addr, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("connect to the container's monitor: %w", err)
	}
	return conn, nil
}

// monitorPeer returns the pid of the process listening on the control
// socket in dir (the socket's peer credentials), 0 when none answers.
func monitorPeer(dir string) int {
	conn, err := dialMonitor(dir)
	if err != nil {
		return 0
	}
	defer conn.Close()
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0
	}
	pid := 0
	raw.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}

// callMonitor sends one request (with files) to the monitor of the
// container in dir and returns its reply.
func callMonitor(dir string, req *request, files []*os.File, timeout time.Duration) (*reply, error) {
	conn, err := dialMonitor(dir)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if err := sendMsg(conn, req, files); err != nil {
		return nil, err
	}
	var rep reply
	got, err := recvMsg(conn, &rep)
	closeFiles(got)
	if err != nil {
		return nil, fmt.Errorf("the container's monitor: %w", err)
	}
	if rep.Error != "" {
		return &rep, errors.New(rep.Error)
	}
	return &rep, nil
}

func sendMsg(conn *net.UnixConn, v any, files []*os.File) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > maxMessage {
		return fmt.Errorf("message of %d bytes", len(b))
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	_, _, err = conn.WriteMsgUnix(b, oob, nil)
	return err
}

// recvMsg reads one message into v and returns the files that came with
// it (the caller closes them).
func recvMsg(conn *net.UnixConn, v any) ([]*os.File, error) {
	buf := make([]byte, maxMessage+1)
	oob := make([]byte, unix.CmsgSpace(maxMsgFiles*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	files, ferr := parseRights(oob[:oobn])
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > maxMessage {
		closeFiles(files)
		return nil, errors.New("message too large")
	}
	if ferr != nil {
		closeFiles(files)
		return nil, ferr
	}
	if n == 0 {
		closeFiles(files)
		return nil, errors.New("connection closed")
	}
	if err := json.Unmarshal(buf[:n], v); err != nil {
		closeFiles(files)
		return nil, fmt.Errorf("decode message: %w", err)
	}
	return files, nil
}

// parseRights returns the descriptors of SCM_RIGHTS control messages.
func parseRights(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			files = append(files, os.NewFile(uintptr(fd), "received"))
		}
	}
	if len(files) > maxMsgFiles {
		return files, fmt.Errorf("%d descriptors, at most %d", len(files), maxMsgFiles)
	}
	return files, nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}
