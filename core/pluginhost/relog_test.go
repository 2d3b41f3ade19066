package pluginhost

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
)

// pluginLine is what a plugin's hclog JSON logger writes.
func pluginLine(t *testing.T, level, msg string, kv ...any) string {
	t.Helper()
	var b bytes.Buffer
	l := hclog.New(&hclog.LoggerOptions{Output: &b, JSONFormat: true, Level: hclog.Trace}).Named("blk-raw")
	l.Log(hclog.LevelFromString(level), msg, kv...)
	return b.String()
}

func TestPluginLogKeepsTypes(t *testing.T) {
	line := pluginLine(t, "info", "serving raw image", "image", "/tmp/x.img", "bytes", int64(1<<30),
		"big", uint64(1<<63+5), "ratio", 0.5, "readonly", false, "note", "two words")
	var host bytes.Buffer
	w := newPluginLog(hclog.New(&hclog.LoggerOptions{Output: &host, JSONFormat: true, Level: hclog.Info}).Named("krun-plugin-blk-raw"), "blk-raw", nil)
	// go-plugin writes the line and its newline separately; split it
	// further to check reassembly.
	for _, piece := range []string{line[:7], line[7:]} {
		w.Write([]byte(piece))
	}
	dec := json.NewDecoder(&host)
	dec.UseNumber()
	var e map[string]any
	if err := dec.Decode(&e); err != nil {
		t.Fatalf("host log %q: %v", host.String(), err)
	}
	want := map[string]string{"bytes": "1073741824", "big": "9223372036854775813", "ratio": "0.5"}
	for k, v := range want {
		if n, ok := e[k].(json.Number); !ok || n.String() != v {
			t.Errorf("%s = %#v, want the number %s", k, e[k], v)
		}
	}
	if e["image"] != "/tmp/x.img" || e["note"] != "two words" || e["readonly"] != false {
		t.Errorf("strings or bool changed: %v", e)
	}
	if e["@message"] != "serving raw image" || e["@level"] != "info" || e["@module"] != "krun-plugin-blk-raw" {
		t.Errorf("message, level or module: %v", e)
	}
	if _, ok := e["timestamp"]; ok {
		t.Errorf("a second timestamp field: %v", e)
	}

	var text bytes.Buffer
	w = newPluginLog(hclog.New(&hclog.LoggerOptions{Output: &text, Level: hclog.Info}), "blk-raw", nil)
	w.Write([]byte(line))
	got := text.String()
	for _, s := range []string{"bytes=1073741824", "image=/tmp/x.img", `note="two words"`, "readonly=false"} {
		if !strings.Contains(got, s) {
			t.Errorf("text log %q lacks %s", got, s)
		}
	}
	if strings.Contains(got, "timestamp=") || strings.Contains(got, "@module") || strings.Count(got, "\n") != 1 {
		t.Errorf("text log %q: want one line, no timestamp= field and no @module", got)
	}
}

func TestPluginLogLevelsAndPanics(t *testing.T) {
	var out bytes.Buffer
	w := newPluginLog(hclog.New(&hclog.LoggerOptions{Output: &out, Level: hclog.Info}), "x", nil)
	w.Write([]byte(pluginLine(t, "debug", "hidden detail")))
	w.Write([]byte(pluginLine(t, "warn", "shown warning")))
	w.Write([]byte("\n\r\n"))
	w.Write([]byte("[INFO] plain info line\nplain debug line\npanic: boom\n\ngoroutine 1 [running]:\n"))
	got := out.String()
	for _, s := range []string{"[WARN]  shown warning", "[INFO]  [INFO] plain info line", "[ERROR] panic: boom", "[ERROR] goroutine 1 [running]:"} {
		if !strings.Contains(got, s) {
			t.Errorf("log lacks %q:\n%s", s, got)
		}
	}
	for _, s := range []string{"hidden detail", "plain debug line"} {
		if strings.Contains(got, s) {
			t.Errorf("log has %q below its level:\n%s", s, got)
		}
	}
	if n := strings.Count(got, "\n"); n != 4 {
		t.Errorf("%d lines, want 4 (blank lines dropped):\n%s", n, got)
	}
}

func TestPluginLogLongLine(t *testing.T) {
	var out bytes.Buffer
	w := newPluginLog(hclog.New(&hclog.LoggerOptions{Output: &out, Level: hclog.Trace}), "x", nil)
	w.Write(bytes.Repeat([]byte("a"), 3*maxLogLine+10))
	if n := strings.Count(out.String(), "\n"); n != 3 {
		t.Errorf("%d lines logged for a line of 3 pieces and a rest, want 3", n)
	}
	if n := w.w.Pending(); n != 10 {
		t.Errorf("%d bytes kept, want 10", n)
	}
}
