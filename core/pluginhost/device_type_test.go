package pluginhost

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/devopts"
)

// TestBuiltinPluginMustServeItsDeviceType: a built-in plugin parses hostile
// bytes (a qcow2 image, a guest's packets) and may be compromised. One
// that answered Configure with another virtio device type was accepted,
// and the guest took it for that device: a blk plugin serving a console
// whose port bears the command's stdio name reaches the command's input
// and output, which the user gave the console plugin only. Configure
// refuses it and kills the plugin; a third-party kind names its own type.
func TestBuiltinPluginMustServeItsDeviceType(t *testing.T) {
	tests := []struct {
		kind, typ string
		ok        bool
	}{
		{devopts.KindBlkQCOW2, "3", false}, // a console
		{devopts.KindBlkRaw, "26", false},  // a virtio-fs share
		{devopts.KindNetPasst, "2", false},
		{devopts.KindConsole, "1", false},
		{devopts.KindFS, "0", false},
		{devopts.KindBlkQCOW2, "2", true},
		{devopts.KindFS, "26", true},
		{"test", "3", true}, // a third-party plugin's own choice
	}
	for _, tt := range tests {
		t.Run(tt.kind+"/"+tt.typ, func(t *testing.T) {
			cfg := testConfig(t, "ok")
			cfg.Kind = tt.kind
			cfg.Path = filepath.Join(testPluginDir, ExecutableName("test"))
			cfg.Env = append(cfg.Env, "KRUN_TEST_KIND="+tt.kind, "KRUN_TEST_TYPE="+tt.typ)
			p, err := Launch(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Kill()
			info, _, err := p.Configure(context.Background(), nil)
			if tt.ok {
				if err != nil {
					t.Fatalf("Configure: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("a %s plugin serving virtio device type %d was accepted", tt.kind, info.Type)
			}
			if !strings.Contains(err.Error(), "device type "+tt.typ) {
				t.Errorf("error %q does not name the type served", err)
			}
			select {
			case <-p.Done():
			default:
				t.Error("the refused plugin still runs")
			}
		})
	}
}
