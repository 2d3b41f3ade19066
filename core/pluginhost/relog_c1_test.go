package pluginhost

import (
	"bytes"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
)

// A plugin's stderr line is re-logged on krun-core's stderr (the user's
// terminal; with `run -- CMD` at ERROR and above, which a "[ERROR]" prefix
// chooses). SECURITY.md: a line with a control character is quoted, so it
// cannot pass for another component's line nor reach the terminal as an
// escape sequence. A raw 8-bit C1 byte (0x9b CSI) is one, and passes.
func TestRelogQuotesRawC1Bytes(t *testing.T) {
	var out bytes.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: &out, Level: hclog.Error})
	l := newPluginLog(log, "blk-raw", nil)
	l.Write([]byte("[ERROR] x\x9b2J\x9b1;1H\n"))
	if !bytes.Contains(out.Bytes(), []byte("[ERROR]")) {
		t.Fatalf("line not re-logged: %q", out.String())
	}
	if bytes.IndexByte(out.Bytes(), 0x9b) >= 0 {
		t.Errorf("raw CSI byte 0x9b reached krun-core's log output: %q", out.String())
	}
}
