package devspec

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/internal/syncbuf"
)

func TestParseVhostUser(t *testing.T) {
	long := "/" + strings.Repeat("s", 107)
	tests := []struct {
		in      string
		want    *VhostUserSpec
		queues  int // NumQueues
		qsize   int // MaxQueueSize
		wantErr string
	}{
		{in: "type=blk,socket=/run/qsd.sock", want: &VhostUserSpec{TypeName: "blk", Type: 2, Socket: "/run/qsd.sock"}, queues: 1, qsize: 128},
		{in: "socket=a,,b.sock,type=fs,tag=share,queues=2,queue-size=1024",
			want:   &VhostUserSpec{TypeName: "fs", Type: 26, Socket: "a,b.sock", Queues: 2, QueueSize: 1024, Tag: "share"},
			queues: 3, qsize: 1024},
		{in: "type=net,socket=n.sock", want: &VhostUserSpec{TypeName: "net", Type: 1, Socket: "n.sock"}, queues: 2, qsize: 256},
		{in: "type=4,socket=rng.sock,queues=1", want: &VhostUserSpec{TypeName: "4", Type: 4, Socket: "rng.sock", Queues: 1}, queues: 1, qsize: 256},
		{in: "type=2,socket=b.sock", want: &VhostUserSpec{TypeName: "blk", Type: 2, Socket: "b.sock"}, queues: 1, qsize: 128},
		{in: "type=blk,socket=b.sock,reconnect=2", want: &VhostUserSpec{TypeName: "blk", Type: 2, Socket: "b.sock", Reconnect: 2 * time.Second}, queues: 1, qsize: 128},
		{in: "type=net,socket=n.sock,reconnect=0.25", want: &VhostUserSpec{TypeName: "net", Type: 1, Socket: "n.sock", Reconnect: 250 * time.Millisecond}, queues: 2, qsize: 256},
		{in: "type=blk,socket=x,reconnect=0", wantErr: `reconnect="0": want seconds from 0.001 to 3600`},
		{in: "type=blk,socket=x,reconnect=3601", wantErr: "want seconds from 0.001 to 3600"},
		{in: "type=blk,socket=x,reconnect=NaN", wantErr: "want seconds from 0.001 to 3600"},
		{in: "type=blk,socket=x,reconnect=-1", wantErr: "want seconds from 0.001 to 3600"},
		{in: "type=fs,socket=x,reconnect=1", wantErr: "reconnect= is not for type=fs"},
		{in: "socket=x", wantErr: "type= is required"},
		{in: "type=blk", wantErr: "socket= is required"},
		{in: "type=scsi,socket=x", wantErr: `type="scsi": want blk, fs, net or a virtio device ID`},
		{in: "type=0,socket=x", wantErr: "virtio device ID from 1 to 255"},
		{in: "type=256,socket=x", wantErr: "virtio device ID from 1 to 255"},
		{in: "type=blk,socket=", wantErr: "socket= is empty"},
		{in: "type=blk,socket=" + long, wantErr: "longer than the 107 bytes"},
		{in: "type=blk,socket=x,queues=0", wantErr: `queues="0": want a number from 1 to 64`},
		{in: "type=blk,socket=x,queues=65", wantErr: "from 1 to 64"},
		{in: "type=blk,socket=x,queues=two", wantErr: `queues="two"`},
		{in: "type=blk,socket=x,queue-size=100", wantErr: "queue-size=100: want a power of two"},
		{in: "type=blk,socket=x,queue-size=65536", wantErr: "queue-size=\"65536\": want a number from 1 to 32768"},
		{in: "type=net,socket=x,queues=2", wantErr: "one receive and one transmit queue"},
		{in: "type=blk,socket=x,tag=t", wantErr: "tag= is for type=fs only"},
		{in: "type=fs,socket=x,tag=" + strings.Repeat("t", 37), wantErr: "longer than 36 bytes"},
		{in: "type=fs,socket=x,tag=a\x01b", wantErr: "control or invalid character"},
		{in: "type=blk,socket=x,type=fs", wantErr: `"type=" given twice`},
		{in: "type=blk,socket=x,cache=none", wantErr: `unknown key "cache" (want type, socket, queues, queue-size, tag, reconnect)`},
		{in: "type=blk,socket=x,readonly", wantErr: `"readonly" is not key=value`},
		{in: "", wantErr: "empty option string"},
	}
	for _, tc := range tests {
		got, err := ParseVhostUser(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || strings.Contains(err.Error(), "\n") {
				t.Errorf("ParseVhostUser(%q) = %v, %v; want one-line error containing %q", tc.in, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseVhostUser(%q): %v", tc.in, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseVhostUser(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		if got.NumQueues() != tc.queues || got.MaxQueueSize() != tc.qsize {
			t.Errorf("%q: %d queues of at most %d, want %d of %d", tc.in, got.NumQueues(), got.MaxQueueSize(), tc.queues, tc.qsize)
		}
		again, err := ParseVhostUser(got.String())
		if err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("round trip of %q via %q: %+v, %v", tc.in, got.String(), again, err)
		}
		if _, err := got.Open(OpenOptions{}); err != ErrExternal {
			t.Errorf("Open of an external back-end: %v", err)
		}
	}
	if s, err := Parse("--vhost-user", "type=blk,socket=x"); err != nil || s.Kind() != "vhost-user-blk" {
		t.Errorf("Parse(--vhost-user) = %v, %v", s, err)
	}
}

func TestVhostUserCheckSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o644)
	for path, want := range map[string]string{
		sock:                         "",
		filepath.Join(dir, "absent"): "no such file or directory",
		file:                         "is not a socket",
	} {
		v, err := NewVhostUser("blk", path, 0, 0, "")
		if err != nil {
			t.Fatal(err)
		}
		err = v.CheckSocket()
		if (want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), want)) {
			t.Errorf("CheckSocket(%s) = %v, want %q", path, err, want)
		}
	}
}

func TestHelperLog(t *testing.T) {
	var out bytes.Buffer
	w := HelperLog(hclog.New(&hclog.LoggerOptions{Output: &out, Level: hclog.Info}))
	w.Write([]byte("Failed to send 47 bytes to syslog\nDon't run as root. Changing to nobody...\n\n"))
	w.Write([]byte("Failed to bind port 80: Address in use\nhalf a li"))
	w.Write([]byte("ne\nno newline"))
	w.Close()
	got := out.String()
	if strings.Contains(got, "syslog") || strings.Contains(got, "root") {
		t.Errorf("start-up chatter logged above DEBUG:\n%s", got)
	}
	for _, s := range []string{"[WARN]  Failed to bind port 80: Address in use\n", "[WARN]  half a line\n", "[WARN]  no newline\n"} {
		if !strings.Contains(got, s) {
			t.Errorf("log lacks %q:\n%s", s, got)
		}
	}
	if n := strings.Count(got, "\n"); n != 3 {
		t.Errorf("%d lines, want 3:\n%s", n, got)
	}
}

// A helper's output goes to the log through HelperLog, never to stderr:
// a stand-in passt that prints passt's start-up chatter and an error.
func TestNetOpenHelperLog(t *testing.T) {
	fake := filepath.Join(t.TempDir(), "passt")
	script := "#!/bin/sh\necho 'Failed to send 47 bytes to syslog' >&2\necho \"Don't run as root. Changing to nobody...\" >&2\necho 'Failed to bind port 80' >&2\nexec sleep 30\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	var logs syncbuf.Buffer
	n, _ := ParseNet("passt")
	o, err := n.Open(OpenOptions{PasstPath: fake, HelperStderr: HelperLog(hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Info}))})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), "Failed to bind port 80") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	o.Close()
	got := logs.String()
	if !strings.Contains(got, "[WARN]  Failed to bind port 80") || strings.Contains(got, "syslog") || strings.Contains(got, "root") {
		t.Errorf("helper log:\n%s", got)
	}
}
