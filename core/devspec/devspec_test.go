package devspec

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
)

func TestParseDisk(t *testing.T) {
	tests := []struct {
		in      string
		want    *DiskSpec
		kind    string
		wantErr string // substring; "" means success
	}{
		{in: "path=a.img,format=raw", want: &DiskSpec{Path: "a.img", Format: devopts.Raw}, kind: devopts.KindBlkRaw},
		{in: "format=qcow2,path=/x/b.qcow2,readonly=on", want: &DiskSpec{Path: "/x/b.qcow2", Format: devopts.QCOW2, ReadOnly: true}, kind: devopts.KindBlkQCOW2},
		{in: "path=a,,b.img,format=raw,readonly=off", want: &DiskSpec{Path: "a,b.img", Format: devopts.Raw}, kind: devopts.KindBlkRaw},
		{
			in: "path=top.qcow2,format=qcow2,backing=mid.qcow2,backing-format=qcow2,backing=base.raw,backing-format=raw,max-size=64G,data-file=d.raw",
			want: &DiskSpec{Path: "top.qcow2", Format: devopts.QCOW2,
				Backing: []Backing{{"mid.qcow2", devopts.QCOW2}, {"base.raw", devopts.Raw}},
				MaxSize: 64 << 30, DataFile: "d.raw"},
			kind: devopts.KindBlkQCOW2,
		},
		{in: "path=a.img,format=raw,queues=16", want: &DiskSpec{Path: "a.img", Format: devopts.Raw, Queues: 16}, kind: devopts.KindBlkRaw},
		{in: "path=a.img,format=qcow2,queues=64", want: &DiskSpec{Path: "a.img", Format: devopts.QCOW2, Queues: 64}, kind: devopts.KindBlkQCOW2},
		{in: "path=a.img,format=raw,queues=0", wantErr: "queues=\"0\": want a number of request queues in 1..64"},
		{in: "path=a.img,format=raw,queues=65", wantErr: "in 1..64"},
		{in: "path=a.img,format=raw,queues=many", wantErr: "in 1..64"},
		{in: "path=a.img,format=raw,queues=2,queues=4", wantErr: "queues= given twice"},
		{in: "path=a.img", wantErr: "format= is required"},
		{in: "format=raw", wantErr: "path= is required"},
		{in: "path=a.img,format=vmdk", wantErr: `unknown format "vmdk"`},
		{in: "path=a.img,format=raw,readonly=maybe", wantErr: `readonly="maybe": want on or off`},
		{in: "path=a.img,format=raw,cache=none", wantErr: `unknown key "cache"`},
		{in: "path=a.img,format=raw,path=b.img", wantErr: "path= given twice"},
		{in: "path=a.img,format=raw,", wantErr: "empty option"},
		{in: "", wantErr: "empty option string"},
		{in: "path=,format=raw", wantErr: "path= is empty"},
		{in: "path=a.img,format=raw,readonly", wantErr: `"readonly" is not key=value`},
		{in: "=x,path=a,format=raw", wantErr: "has no key"},
		{in: "path=a.img,format=qcow2,backing=b.img", wantErr: "needs backing-format="},
		{in: "path=a.img,format=qcow2,backing=b.img,backing=c.img", wantErr: "needs backing-format= before the next"},
		{in: "path=a.img,format=qcow2,backing-format=raw", wantErr: "must follow its backing="},
		{in: "path=a.img,format=qcow2,backing=b,backing-format=raw,backing-format=raw", wantErr: "must follow its backing="},
		{in: "path=a.img,format=qcow2,backing=b,backing-format=vhdx", wantErr: `backing-format: unknown format "vhdx"`},
		{in: "path=a.img,format=qcow2,backing=b,backing-format=raw,backing=c,backing-format=raw", wantErr: "is raw, which has no backing file"},
		{in: "path=a.img,format=raw,backing=b,backing-format=raw", wantErr: "backing= needs format=qcow2"},
		{in: "path=a.img,format=raw,data-file=d", wantErr: "data-file= needs format=qcow2"},
		{in: "path=a.img,format=raw,max-size=1G", wantErr: "max-size= needs format=qcow2"},
		{in: "path=a.img,format=qcow2,max-size=0", wantErr: "must be positive"},
		{in: "path=a.img,format=qcow2,max-size=-1", wantErr: "is not a size"},
		{in: "path=a.img,format=qcow2,max-size=9999999999999P", wantErr: "too large"},
		{in: "path=a.img,format=qcow2,max-size=1X", wantErr: "is not a size"},
		{in: "path=a\x00b,format=raw", wantErr: "NUL"},
		{in: "path=a,format=raw,bad\nkey=1", wantErr: `unknown key "bad\nkey"`},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseDisk(tc.in)
			if tc.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseDisk(%q) = %+v, want error containing %q", tc.in, got, tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseDisk(%q) error %q, want it to contain %q", tc.in, err, tc.wantErr)
				}
				if strings.ContainsAny(err.Error(), "\n\r") {
					t.Fatalf("error is not one line: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseDisk(%q): %v", tc.in, err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ParseDisk(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
			if got.Kind() != tc.kind {
				t.Fatalf("Kind() = %q, want %q", got.Kind(), tc.kind)
			}
			again, err := ParseDisk(got.String())
			if err != nil || !reflect.DeepEqual(again, got) {
				t.Fatalf("round trip of %q via %q: %+v, %v", tc.in, got.String(), again, err)
			}
		})
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"512", 512, true},
		{"64K", 64 << 10, true},
		{"10m", 10 << 20, true},
		{"64G", 64 << 30, true},
		{"64GiB", 64 << 30, true},
		{"2T", 2 << 40, true},
		{"1P", 1 << 50, true},
		{"8191P", 8191 << 50, true},
		{"8192P", 0, false},
		{"9223372036854775807", 9223372036854775807, true},
		{"9223372036854775808", 0, false},
		{"", 0, false},
		{"G", 0, false},
		{"1.5G", 0, false},
		{"+1", 0, false},
		{"0x10", 0, false},
	}
	for _, tc := range tests {
		got, err := ParseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestParseFS(t *testing.T) {
	tests := []struct {
		in      string
		want    *FSSpec
		wantErr string
	}{
		{in: "path=/srv,tag=share", want: &FSSpec{Path: "/srv", Tag: "share"}},
		{in: "tag=t,path=/srv,readonly=on", want: &FSSpec{Path: "/srv", Tag: "t", ReadOnly: true}},
		{in: "path=/srv", wantErr: "tag= is required"},
		{in: "tag=x", wantErr: "path= is required"},
		{in: "path=/srv,tag=" + strings.Repeat("t", 37), wantErr: "longer than 36"},
		{in: "path=/srv,tag=a\tb", wantErr: "control"},
		{in: "path=/srv,tag=x,cache=5,uidmap=0:1000:1", want: &FSSpec{Path: "/srv", Tag: "x",
			PluginOptions: map[string]string{"cache": "5", "uidmap": "0:1000:1"}}},
		{in: "path=/srv,tag=x,dax=on", wantErr: `unknown key "dax"`},
		{in: "path=/srv,tag=x,cache=1,cache=2", wantErr: "given twice"},
		{in: "path=/srv,tag=x,cache=none", wantErr: "want seconds from 0 to 3600"},
		{in: "path=/srv,tag=x,uidmap=0:1000", wantErr: "GUEST:HOST:COUNT"},
		{in: "path=/srv,tag=x,workers=0", wantErr: "want 1..256"},
		{in: "path=/srv,tag=x,xattr=yes", wantErr: "want on or off"},
		{in: "path=/srv,tag=x,tag=y", wantErr: "given twice"},
		{in: "path=/srv,tag=x,readonly=1", wantErr: "want on or off"},
		{in: "path=/srv,tag=x,mount=/data", want: &FSSpec{Path: "/srv", Tag: "x", Mount: "/data"}},
		{in: "path=/srv,tag=x,mount=/a/../b/", want: &FSSpec{Path: "/srv", Tag: "x", Mount: "/b"}},
		{in: "path=/srv,tag=x,mount=data", wantErr: "not an absolute path"},
		{in: "path=/srv,tag=x,mount=/", wantErr: "guest's root"},
		{in: "path=/srv,tag=x,mount=/a/..", wantErr: "guest's root"},
		{in: "path=/srv,tag=x,mount=", wantErr: "mount= is empty"},
		{in: "path=/srv,tag=x,mount=/a\tb", wantErr: "control"},
		{in: "path=/srv,tag=x,mount=/" + strings.Repeat("a", 4095), wantErr: "longer than 4095"},
		{in: "path=/srv,tag=x,mount=/proc", wantErr: "guest's own mounts"},
		{in: "path=/srv,tag=x,mount=/proc/1", wantErr: "guest's own mounts"},
		{in: "path=/srv,tag=x,mount=/sys/", wantErr: "guest's own mounts"},
		{in: "path=/srv,tag=x,mount=/dev/shm", wantErr: "guest's own mounts"},
		{in: "path=/srv,tag=x,mount=/x/../dev", wantErr: "guest's own mounts"},
		{in: "path=/srv,tag=x,mount=/processes", want: &FSSpec{Path: "/srv", Tag: "x", Mount: "/processes"}},
		{in: "path=/srv,tag=x,open-files=100000", want: &FSSpec{Path: "/srv", Tag: "x", OpenFiles: 100000}},
		{in: "path=/srv,tag=x,open-files=1024", want: &FSSpec{Path: "/srv", Tag: "x", OpenFiles: 1024}},
		{in: "path=/srv,tag=x,open-files=1048576", want: &FSSpec{Path: "/srv", Tag: "x", OpenFiles: 1 << 20}},
		{in: "path=/srv,tag=x,open-files=1023", wantErr: "want a number of files from 1024 to 1048576"},
		{in: "path=/srv,tag=x,open-files=1048577", wantErr: "want a number of files from 1024 to 1048576"},
		{in: "path=/srv,tag=x,open-files=0", wantErr: "want a number of files"},
		{in: "path=/srv,tag=x,open-files=-5", wantErr: "want a number of files"},
		{in: "path=/srv,tag=x,open-files=4k", wantErr: "want a number of files"},
		{in: "path=/srv,tag=x,open-files=2000,open-files=3000", wantErr: "given twice"},
	}
	for _, tc := range tests {
		got, err := ParseFS(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("ParseFS(%q) = %+v, %v; want error containing %q", tc.in, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseFS(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			continue
		}
		if again, err := ParseFS(got.String()); err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("round trip %q: %+v, %v", got.String(), again, err)
		}
	}
}

func TestParseNet(t *testing.T) {
	mac, _ := ParseMAC("52:54:00:12:34:56")
	tests := []struct {
		in      string
		want    *NetSpec
		wantErr string
	}{
		{in: "passt", want: &NetSpec{Backend: "passt"}},
		{in: "passt,mac=52:54:00:12:34:56", want: &NetSpec{Backend: "passt", MAC: mac}},
		{in: "passt,ports=8080:80,8443:443,22", want: &NetSpec{Backend: "passt",
			Ports: []PortForward{{8080, 80}, {8443, 443}, {22, 22}}}},
		{in: "passt,ports=8080:80,mac=52:54:00:12:34:56", want: &NetSpec{Backend: "passt", MAC: mac,
			Ports: []PortForward{{8080, 80}}}},
		{in: "tap", wantErr: `unknown network back-end "tap"`},
		{in: "mac=52:54:00:12:34:56", wantErr: "first item must name the back-end"},
		{in: "passt,mac=01:00:00:00:00:01", wantErr: "multicast"},
		{in: "passt,mac=zz", wantErr: "not a 48-bit MAC"},
		{in: "passt,mac=00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01", wantErr: "not a 48-bit MAC"},
		{in: "passt,ports=0:80", wantErr: "HOST:GUEST"},
		{in: "passt,ports=65536:80", wantErr: "HOST:GUEST"},
		{in: "passt,ports=80:", wantErr: "HOST:GUEST"},
		{in: "passt,ports=8080:80,8080:81", wantErr: "forwarded twice"},
		{in: "passt,8080:80", wantErr: "is not key=value"},
		{in: "passt,mac=52:54:00:12:34:56,80", wantErr: "is not key=value"},
		{in: "passt,vhost=on", wantErr: `unknown key "vhost"`},
		{in: "passt,mtu=1500", want: &NetSpec{Backend: "passt", MTU: 1500}},
		{in: "passt,mtu=67", wantErr: `mtu="67"`},
		{in: "passt,mtu=70000", wantErr: `mtu="70000"`},
		{in: "passt,mtu=65521", want: &NetSpec{Backend: "passt", MTU: 65521}},
		{in: "passt,mtu=65522", wantErr: `mtu="65522" is not a number from 68 to 65521`},
		{in: "passt,passt-arg=--no-dhcp-dns,passt-arg=-4", want: &NetSpec{Backend: "passt", PasstArgs: []string{"--no-dhcp-dns", "-4"}}},
		{in: "passt,passt-arg=--fd", wantErr: "passes passt its socket"},
		// Every spelling getopt takes for passt's -F/--fd and -s/--socket
		// (review): each would replace krun-core's socket pair.
		{in: "passt,passt-arg=-F", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=-F4", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=-qF4", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=--fd=4", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=-s/tmp/x.sock", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=--socket=/tmp/x.sock", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=--socket-path=/tmp/x.sock", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=--mtu=9000", wantErr: "give the MTU as mtu=N"},
		{in: "passt,passt-arg=--mt", wantErr: "give the MTU as mtu=N"},
		{in: "passt,mtu=1500,passt-arg=-m9000", wantErr: "give the MTU as mtu=N"},
		{in: "passt,passt-arg=-4m", wantErr: "give the MTU as mtu=N"},
		{in: "passt,passt-arg=-P/run/m.pid", want: &NetSpec{Backend: "passt", PasstArgs: []string{"-P/run/m.pid"}}},
		{in: "passt,passt-arg=--map-gw", want: &NetSpec{Backend: "passt", PasstArgs: []string{"--map-gw"}}},
		{in: "passt,passt-arg=-t,passt-arg=8080", want: &NetSpec{Backend: "passt", PasstArgs: []string{"-t", "8080"}}},
		// getopt_long's abbreviations (review of the review) ...
		{in: "passt,passt-arg=--sock=/tmp/x.sock", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=--soc=/tmp/x.sock", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=--socke", wantErr: "passes passt its socket"},
		// ... and a group's value is not options: these are -P, -l, -i.
		{in: "passt,passt-arg=-P/run/passt.pid", want: &NetSpec{Backend: "passt", PasstArgs: []string{"-P/run/passt.pid"}}},
		{in: "passt,passt-arg=-l/var/log/passt.log", want: &NetSpec{Backend: "passt", PasstArgs: []string{"-l/var/log/passt.log"}}},
		{in: "passt,passt-arg=-qiens3", want: &NetSpec{Backend: "passt", PasstArgs: []string{"-qiens3"}}},
		{in: "passt,passt-arg=-qs", wantErr: "passes passt its socket"},
		{in: "passt,passt-arg=-qHfs01", want: &NetSpec{Backend: "passt", PasstArgs: []string{"-qHfs01"}}},
		{in: "passt,passt-arg=--foreground", want: &NetSpec{Backend: "passt", PasstArgs: []string{"--foreground"}}},
		{in: "passt,mac=00:00:00:00:00:00", wantErr: "all-zero"},
		{in: "passt,passt-arg=", wantErr: "non-empty"},
	}
	for _, tc := range tests {
		got, err := ParseNet(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("ParseNet(%q) = %+v, %v; want error containing %q", tc.in, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseNet(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			continue
		}
		if again, err := ParseNet(got.String()); err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("round trip %q: %+v, %v", got.String(), again, err)
		}
	}
}

func TestParsePlugin(t *testing.T) {
	tests := []struct {
		in      string
		want    *PluginSpec
		wantErr string
	}{
		{in: "null", want: &PluginSpec{PluginKind: "null", Options: map[string]string{}}},
		{in: "rng-2,fill=zero,x=a,,b", want: &PluginSpec{PluginKind: "rng-2", Options: map[string]string{"fill": "zero", "x": "a,b"}}},
		{in: "fill=zero", wantErr: "first item must be the plugin kind"},
		{in: "../x", wantErr: "want 1-64 characters"},
		{in: "Null", wantErr: "want 1-64 characters"},
		{in: "null,fill", wantErr: "is not key=value"},
		{in: "null,a=1,a=2", wantErr: "given twice"},
		{in: "img", wantErr: "not a device"},
		{in: "rng,file.source=/dev/hwrng,file-rw.log=/var/log/rng.log,fill=file", want: &PluginSpec{PluginKind: "rng",
			Options: map[string]string{"fill": "file"},
			Files:   []PluginFile{{Name: "source", Path: "/dev/hwrng"}, {Name: "log", Path: "/var/log/rng.log", Write: true}}}},
		{in: "rng,file.a=/x,file-rw.a=/y", wantErr: "file a given twice"},
		{in: "rng,file.=/x", wantErr: "the file's name after the dot"},
		{in: "rng,file.A=/x", wantErr: "the file's name after the dot"},
		{in: "rng,file.a/b=/x", wantErr: "the file's name after the dot"},
		{in: "rng,file.a=", wantErr: "no path"},
		{in: "rng" + manyFiles(MaxPluginFiles), want: &PluginSpec{PluginKind: "rng", Options: map[string]string{}, Files: filesF(MaxPluginFiles)}},
		{in: "rng" + manyFiles(MaxPluginFiles+1), wantErr: "more than 16 files"},
	}
	for _, tc := range tests {
		got, err := ParsePlugin(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("ParsePlugin(%q) = %+v, %v; want error containing %q", tc.in, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParsePlugin(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			continue
		}
		if len(got.Files) == 0 {
			o, err := got.Open(OpenOptions{})
			if err != nil || o.Kind != tc.want.PluginKind || !reflect.DeepEqual(o.Options, tc.want.Options) || len(o.Files) != 0 {
				t.Errorf("Open of %q = %+v, %v", tc.in, o, err)
			}
		}
		if again, err := ParsePlugin(got.String()); err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("round trip %q: %+v, %v", got.String(), again, err)
		}
	}
}

func TestParseDispatch(t *testing.T) {
	for flag, kind := range map[string]string{"--disk": devopts.KindBlkRaw, "fs": devopts.KindFS, "-net": devopts.KindNetPasst} {
		val := map[string]string{"--disk": "path=a,format=raw", "fs": "path=/,tag=t", "-net": "passt"}[flag]
		s, err := Parse(flag, val)
		if err != nil || s.Kind() != kind {
			t.Errorf("Parse(%q, %q) = %v, %v; want kind %q", flag, val, s, err, kind)
		}
	}
	if _, err := Parse("--chardev", "x"); err == nil {
		t.Error("Parse(--chardev) succeeded")
	}
}

// accMode returns the O_ACCMODE bits of f.
func accMode(t *testing.T, f *os.File) int {
	t.Helper()
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fl&unix.O_NONBLOCK != 0 {
		t.Errorf("%s left O_NONBLOCK", f.Name())
	}
	return fl & unix.O_ACCMODE
}

func TestDiskOpen(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"top", "mid", "base", "data"} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	p := func(n string) string { return filepath.Join(dir, n) }
	if err := unix.Mkfifo(p("fifo"), 0o600); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		spec    string
		files   map[string]int // name -> access mode
		opts    map[string]string
		wantErr string
	}{
		{
			spec:  "path=" + p("top") + ",format=raw",
			files: map[string]int{devopts.FileImage: unix.O_RDWR},
			opts:  map[string]string{devopts.OptFormat: "raw", devopts.OptReadOnly: "off", devopts.OptPath: p("top")},
		},
		{
			spec:  "path=" + p("top") + ",format=raw,readonly=on",
			files: map[string]int{devopts.FileImage: unix.O_RDONLY},
			opts:  map[string]string{devopts.OptFormat: "raw", devopts.OptReadOnly: "on", devopts.OptPath: p("top")},
		},
		{
			spec: "path=" + p("top") + ",format=qcow2,backing=" + p("mid") + ",backing-format=qcow2,backing=" + p("base") +
				",backing-format=raw,data-file=" + p("data") + ",max-size=1M",
			files: map[string]int{devopts.FileImage: unix.O_RDWR, "backing.0": unix.O_RDONLY, "backing.1": unix.O_RDONLY, devopts.FileDataFile: unix.O_RDWR},
			opts: map[string]string{devopts.OptFormat: "qcow2", devopts.OptReadOnly: "off", "backing.0.format": "qcow2",
				"backing.1.format": "raw", devopts.OptMaxSize: "1048576", devopts.OptPath: p("top"), "backing.0.path": p("mid"),
				"backing.1.path": p("base"), devopts.OptDataFilePath: p("data")},
		},
		{spec: "path=" + p("missing") + ",format=raw", wantErr: "disk image: open " + p("missing") + ": no such file or directory"},
		{spec: "path=" + dir + ",format=raw", wantErr: "is not a regular file or block device"},
		{spec: "path=" + p("fifo") + ",format=raw,readonly=on", wantErr: "is not a regular file or block device"},
		{spec: "path=" + p("top") + ",format=qcow2,backing=" + p("nope") + ",backing-format=raw", wantErr: "backing file: open"},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			d, err := ParseDisk(tc.spec)
			if err != nil {
				t.Fatal(err)
			}
			o, err := d.Open(OpenOptions{})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Open = %v, want error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			if o.Kind != d.Kind() {
				t.Errorf("Kind %q, want %q", o.Kind, d.Kind())
			}
			if !reflect.DeepEqual(o.Options, tc.opts) {
				t.Errorf("Options %v, want %v", o.Options, tc.opts)
			}
			got := map[string]int{}
			for _, f := range o.Files {
				got[f.Name] = accMode(t, f.File)
			}
			if !reflect.DeepEqual(got, tc.files) {
				t.Errorf("files %v, want %v", got, tc.files)
			}
			if o.Files[0].Name != devopts.FileImage {
				t.Errorf("first file %q, want image (fd 4)", o.Files[0].Name)
			}
		})
	}
}

// TestDiskOpenLocks: the image (and data file) are locked as a writer, or
// as a reader with readonly=on, backing files as readers; the locks outlive
// CloseFiles (the plugin's copies and the host's duplicate hold them) and
// go with Close.
func TestDiskOpenLocks(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	for _, n := range []string{"top", "base", "data"} {
		if err := os.WriteFile(p(n), make([]byte, 4096), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	open := func(spec string) (*Opened, error) {
		t.Helper()
		d, err := ParseDisk(spec)
		if err != nil {
			t.Fatal(err)
		}
		return d.Open(OpenOptions{})
	}
	full := "path=" + p("top") + ",format=qcow2,backing=" + p("base") + ",backing-format=raw,data-file=" + p("data")
	w, err := open(full)
	if err != nil {
		t.Fatal(err)
	}
	w.CloseFiles() // as serve does once the plugin has its copies
	refusals := []struct{ spec, want string }{
		{"path=" + p("top") + ",format=qcow2,readonly=on",
			"image " + p("top") + " is in use by another process (write lock): refusing to open it read-only"},
		{"path=" + p("data") + ",format=raw",
			"image " + p("data") + " is in use by another process (write lock): refusing to open it read-write"},
		{"path=" + p("base") + ",format=raw",
			"image " + p("base") + " is in use by another process (lock that does not share write): refusing to open it read-write"},
	}
	for _, r := range refusals {
		if _, err := open(r.spec); err == nil || err.Error() != r.want {
			t.Errorf("%s:\n got %v\nwant %s", r.spec, err, r.want)
		}
	}
	// Readers of the backing file coexist.
	ro, err := open("path=" + p("base") + ",format=raw,readonly=on")
	if err != nil {
		t.Fatalf("a second reader of the backing file: %v", err)
	}
	ro.Close()
	w.Close()
	// Every lock went with Close.
	for _, n := range []string{"top", "base", "data"} {
		o, err := open("path=" + p(n) + ",format=raw")
		if err != nil {
			t.Fatalf("%s after Close: %v", n, err)
		}
		o.Close()
	}
	// The same file twice in one device is named as such.
	if _, err := open("path=" + p("top") + ",format=qcow2,backing=" + p("top") + ",backing-format=raw"); err == nil ||
		err.Error() != "backing file "+p("top")+" is the same file as the disk image" {
		t.Errorf("image as its own backing file: %v", err)
	}
}

func TestDiskOpenRelativePath(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "img"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	d, _ := ParseDisk("path=./img,format=raw")
	o, err := d.Open(OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if want := filepath.Join(dir, "img"); o.Options[devopts.OptPath] != want {
		t.Fatalf("path option %q, want %q", o.Options[devopts.OptPath], want)
	}
}

// TestDiskOpenQueues: queues= reaches the plugin as its option; without
// it the plugin's default applies (no option).
func TestDiskOpenQueues(t *testing.T) {
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for spec, want := range map[string]string{"path=" + img + ",format=raw,queues=12": "12", "path=" + img + ",format=raw": ""} {
		d, err := ParseDisk(spec)
		if err != nil {
			t.Fatal(err)
		}
		o, err := d.Open(OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := o.Options[devopts.OptQueues]; got != want || ok != (want != "") {
			t.Errorf("%s: queues option %q (set %v), want %q", spec, got, ok, want)
		}
		o.Close()
	}
}

func TestFSOpen(t *testing.T) {
	dir := t.TempDir()
	f, _ := ParseFS("path=" + dir + ",tag=share,readonly=on")
	o, err := f.Open(OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if len(o.Files) != 1 || o.Files[0].Name != devopts.FileDir || o.Options[devopts.OptTag] != "share" || o.Options[devopts.OptReadOnly] != "on" {
		t.Fatalf("opened %+v", o)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(o.Files[0].File.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		t.Fatalf("fd is not a directory: %v", err)
	}

	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	f, _ = ParseFS("path=" + file + ",tag=share")
	if _, err := f.Open(OpenOptions{}); err == nil || !strings.Contains(err.Error(), "is not a directory") {
		t.Fatalf("opening a file as --fs: %v", err)
	}
}

func TestNetOpenPasst(t *testing.T) {
	passt, err := exec.LookPath("passt")
	if err != nil {
		t.Skip("passt is not installed")
	}
	n, _ := ParseNet("passt,ports=18080:80")
	o, err := n.Open(OpenOptions{PasstPath: passt})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Files) != 1 || o.Files[0].Name != devopts.FilePasst {
		t.Fatalf("files %+v", o.Files)
	}
	mac, err := ParseMAC(o.Options[devopts.OptMAC])
	if err != nil || mac[0]&2 == 0 {
		t.Fatalf("generated MAC %q: %v", o.Options[devopts.OptMAC], err)
	}
	if len(o.helpers) != 1 || o.helpers[0].cmd.Process == nil {
		t.Fatal("passt not started")
	}
	select {
	case <-o.HelperExited():
		t.Fatal("passt exited at once")
	case <-time.After(100 * time.Millisecond):
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	if o.helpers != nil {
		t.Fatal("helpers not cleared")
	}
	select {
	case <-o.HelperExited():
	case <-time.After(5 * time.Second):
		t.Fatal("HelperExited not closed once passt was stopped")
	}

	n, _ = ParseNet("passt")
	if _, err := n.Open(OpenOptions{PasstPath: filepath.Join(t.TempDir(), "no-passt")}); err == nil ||
		!strings.Contains(err.Error(), "start passt") {
		t.Fatalf("missing passt: %v", err)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"path=a.img,format=raw", "path=a,,b,format=qcow2,backing=b,backing-format=raw,max-size=1G", "path=a,format=raw,queues=12",
		"path=/srv,tag=x", "passt,mac=52:54:00:12:34:56,ports=1:2,3",
		// One that each of the other parsers takes, with most of its options.
		"path=d.img,format=qcow2,readonly=on,data-file=d.raw,queues=2,max-size=512M",
		"path=/srv,tag=share,readonly=on,mount=/mnt/x",
		"passt,mac=52:54:00:12:34:56,ports=8080:80,mtu=1500",
		"rng,fill=file,file.source=/dev/hwrng,file-rw.log=/var/log/rng.log",
		"type=blk,socket=/tmp/x.sock,queues=2,queue-size=256,reconnect=1.5",
		"type=fs,socket=/tmp/fs.sock,tag=t",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, flag := range []string{"disk", "fs", "net", "plugin", "vhost-user"} {
			spec, err := Parse(flag, s)
			if err != nil {
				if strings.ContainsAny(err.Error(), "\n\r") {
					t.Fatalf("multi-line error %q", err)
				}
				continue
			}
			again, err := Parse(flag, spec.String())
			if err != nil {
				t.Fatalf("%s %q parsed, but its rendering %q does not: %v", flag, s, spec.String(), err)
			}
			if !reflect.DeepEqual(again, spec) {
				t.Fatalf("%s %q: round trip %+v != %+v", flag, s, again, spec)
			}
		}
	})
}

// TestKernelStateRefused: a file of procfs or sysfs is no disk image (it
// was served as a 0-byte disk, and its flush failed at shutdown), and
// /proc or /sys is no share (from review).
func TestKernelStateRefused(t *testing.T) {
	for _, tc := range []struct{ flag, spec string }{
		{"disk", "path=/proc/self/status,format=raw,readonly=on"},
		{"disk", "path=/sys/kernel/uevent_seqnum,format=raw,readonly=on"},
		{"fs", "path=/proc,tag=p,readonly=on"},
		{"fs", "path=/sys,tag=s,readonly=on"},
	} {
		s, err := Parse(tc.flag, tc.spec)
		if err != nil {
			t.Fatalf("%s %s: %v", tc.flag, tc.spec, err)
		}
		o, err := s.Open(OpenOptions{})
		if err == nil {
			o.Close()
			t.Errorf("--%s %s: opened, want it refused", tc.flag, tc.spec)
		} else if !strings.Contains(err.Error(), "host kernel's own state") {
			t.Errorf("--%s %s: %v", tc.flag, tc.spec, err)
		}
	}
}

func filesF(n int) []PluginFile {
	var out []PluginFile
	for i := range n {
		out = append(out, PluginFile{Name: fmt.Sprintf("f%d", i), Path: "/x"})
	}
	return out
}

func manyFiles(n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, ",file.f%d=/x", i)
	}
	return b.String()
}

// TestPluginFiles: the files a --plugin names are opened by krun-core,
// read-only or read-write as named, and handed over under their names; a
// directory, a missing file or one on the kernel's state is refused with
// one line, by Check (before anything starts) as by Open, and a FIFO does
// not block the open.
func TestPluginFiles(t *testing.T) {
	dir := t.TempDir()
	ro := filepath.Join(dir, "ro")
	rw := filepath.Join(dir, "rw")
	os.WriteFile(ro, []byte("seed"), 0o644)
	os.WriteFile(rw, nil, 0o644)
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := ParsePlugin("rng,fill=file,file.source=" + ro + ",file-rw.log=" + rw + ",file.null=/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Check(); err != nil {
		t.Fatalf("Check: %v", err)
	}
	o, err := p.Open(OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if !reflect.DeepEqual(o.Options, map[string]string{"fill": "file"}) {
		t.Errorf("options %v: the file items are not options", o.Options)
	}
	files := map[string]*os.File{}
	for _, f := range o.Files {
		files[f.Name] = f.File
	}
	if len(files) != 3 {
		t.Fatalf("files %v", o.Files)
	}
	if _, err := files["source"].Write([]byte("x")); err == nil {
		t.Error("file.source was opened for writing")
	}
	if b, err := io.ReadAll(files["source"]); err != nil || string(b) != "seed" {
		t.Errorf("file.source reads %q, %v", b, err)
	}
	if _, err := files["log"].Write([]byte("written")); err != nil {
		t.Errorf("file-rw.log: %v", err)
	}
	for _, tc := range []struct{ spec, want string }{
		{"rng,file.d=" + dir, "is not a regular file or device"},
		{"rng,file-rw.d=" + dir, "is not a regular file or device"},
		{"rng,file.m=" + filepath.Join(dir, "missing"), "no such file"},
		{"rng,file.f=" + fifo, "is not a regular file or device"},
		{"rng,file.p=/proc/self/status", "the host kernel's own state"},
	} {
		p, err := ParsePlugin(tc.spec)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			if err := p.Check(); err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("Check of %s: %v, want one line containing %q", tc.spec, err, tc.want)
			}
			if o, err := p.Open(OpenOptions{}); err == nil || !strings.Contains(err.Error(), tc.want) {
				o.Close()
				t.Errorf("Open of %s: %v, want an error containing %q", tc.spec, err, tc.want)
			}
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("opening %s blocked", tc.spec)
		}
	}
}

// TestPluginFileHostMemoryRefused: a character device that gives the
// host's physical or kernel memory or its I/O ports (/dev/mem, /dev/kmem,
// /dev/port, whatever its path) is refused as a plugin's file, by Check
// (which only stats character devices) and by Open: a plugin holding one
// would be out of its sandbox. Other character devices (/dev/null) pass.
func TestPluginFileHostMemoryRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make device nodes")
	}
	dir := t.TempDir()
	for _, c := range []struct {
		name  string
		minor uint32
		want  string
	}{
		{"mem", 1, "/dev/mem"},
		{"kmem", 2, "/dev/kmem"},
		{"port", 4, "/dev/port"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name)
			if err := unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, c.minor))); err != nil {
				t.Skipf("mknod: %v", err)
			}
			spec, err := ParsePlugin("rng,file.source=" + p)
			if err != nil {
				t.Fatal(err)
			}
			if err := spec.Check(); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Check: %v, want a refusal naming %s", err, c.want)
			}
			o, err := spec.Open(OpenOptions{})
			if err == nil {
				o.Close()
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Open: %v, want a refusal naming %s", err, c.want)
			}
		})
	}
}

// TestDiskOpenReadableOnly: an image this user may read but not write
// (a deployment's shared golden image) is refused for writing with a line
// that names readonly=on, and served with it (found in review,
// helper-143). Root writes any file: it needs another user.
func TestDiskOpenReadableOnly(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root may write a file of mode 0444")
	}
	img := filepath.Join(t.TempDir(), "golden.img")
	if err := os.WriteFile(img, make([]byte, 4096), 0o444); err != nil {
		t.Fatal(err)
	}
	d, err := ParseDisk("path=" + img + ",format=raw")
	if err != nil {
		t.Fatal(err)
	}
	if o, err := d.Open(OpenOptions{}); err == nil {
		o.Close()
		t.Fatal("opened a mode 0444 image for writing")
	} else if !strings.Contains(err.Error(), "permission denied (this user may read it: readonly=on serves it read-only)") {
		t.Errorf("error %q, want one naming readonly=on", err)
	}
	d, err = ParseDisk("path=" + img + ",format=raw,readonly=on")
	if err != nil {
		t.Fatal(err)
	}
	o, err := d.Open(OpenOptions{})
	if err != nil {
		t.Fatalf("readonly=on: %v", err)
	}
	o.Close()
	if err := os.Chmod(img, 0o200); err != nil {
		t.Fatal(err)
	}
	d, _ = ParseDisk("path=" + img + ",format=raw")
	if o, err := d.Open(OpenOptions{}); err == nil {
		o.Close()
	} else if strings.Contains(err.Error(), "readonly=on") {
		t.Errorf("error %q names readonly=on for a file this user may not read either", err)
	}
}
