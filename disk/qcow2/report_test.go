package qcow2

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
)

// TestCorruptionLogLevel: corruption found in a read-only image is logged
// at warn, unless the caller reports the error itself (img convert, which
// printed it twice: from review), when it is logged at debug only.
func TestCorruptionLogLevel(t *testing.T) {
	needQemu(t)
	p := filepath.Join(t.TempDir(), "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
	qio(t, p, "write -P 1 0 1M")
	patch64(t, p, readLayout(t, p).l1, flagCopied|0x40000000) // L2 table past the end
	for _, tt := range []struct {
		name          string
		callerReports bool
		wantWarn      bool
	}{
		{"serving a disk", false, true},
		{"caller reports", true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			log := hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Warn})
			im, err := Open(openFile(t, p, true), Options{ReadOnly: true, Path: p, Logger: log, CallerReports: tt.callerReports})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			if _, err := im.ReadAt(make([]byte, 512), 0); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("read: %v, want corruption", err)
			}
			if got := strings.Contains(buf.String(), "corruption found"); got != tt.wantWarn {
				t.Fatalf("warning logged: %v, want %v; log:\n%s", got, tt.wantWarn, buf.String())
			}
		})
	}
}
