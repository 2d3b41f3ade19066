package main

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// TestStdioVersionHandshake: STDIN_ACK (stdio protocol 2) changed the
// frames between krun-init and this plugin, and initconfig.Version made
// krun-init and krun-core refuse each other across it, but not the
// plugin, a binary of its own found on the plugin path: an older plugin
// took STDIN_ACK for a broken protocol, discarded the rest of the output
// and never answered CLOSE_REQ (which krun-init now waits for without a
// limit), and a newer one with an older krun-init stalled input after the
// window. The core now names the version (stdio=N), which this plugin
// requires and an older one refuses as an unknown option.
func TestStdioVersionHandshake(t *testing.T) {
	o, err := (&devspec.ConsoleSpec{Name: "krun-stdio"}).Open(devspec.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if o.Options[devopts.OptStdio] != strconv.Itoa(stdioframe.Version) {
		t.Fatalf("the core configures the console with %v, no %s=%d", o.Options, devopts.OptStdio, stdioframe.Version)
	}
	if _, err := (plugin{}).Configure(context.Background(), o.Options, nil, nil); err != nil {
		t.Fatalf("the core's options refused: %v", err)
	}
	for _, v := range []string{"", "1", strconv.Itoa(stdioframe.Version + 1)} {
		opts := map[string]string{}
		for k, x := range o.Options {
			opts[k] = x
		}
		if v == "" {
			delete(opts, devopts.OptStdio)
		} else {
			opts[devopts.OptStdio] = v
		}
		if _, err := (plugin{}).Configure(context.Background(), opts, nil, nil); err == nil || !strings.Contains(err.Error(), devopts.OptStdio) {
			t.Errorf("stdio=%q: %v, want a refusal naming %s", v, err, devopts.OptStdio)
		}
	}
}
