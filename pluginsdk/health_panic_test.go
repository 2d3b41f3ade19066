package pluginsdk

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/proto/pluginpb"
	"github.com/krun-core/krun-core/testguest"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/backend"
	"github.com/krun-core/krun-core/vhostuser/backend/backendtest"
)

// panicBlk is a virtio-blk-typed device whose Handle panics: a plugin bug.
type panicBlk struct{}

func (panicBlk) Info() backend.DeviceInfo {
	return backend.DeviceInfo{Type: 2, NumQueues: 1, MaxQueueSize: 256, ProtocolFeatures: vhostuser.ProtocolConfig}
}
func (panicBlk) ReadConfig(_ uint32, p []byte) error { clear(p); return nil }
func (panicBlk) WriteConfig(uint32, []byte) error    { return errors.New("read-only") }
func (panicBlk) SetFeatures(uint64) error            { return nil }
func (panicBlk) Reset()                              {}
func (d panicBlk) Queue(context.Context, int) (backend.QueueConfig, error) {
	return backend.QueueConfig{Handler: d}, nil
}
func (panicBlk) Handle(*backend.Request) { panic("plugin bug: index out of range") }

// TestHandlePanicHealthErrorIsOneLine: docs/PLUGINS.md promises that
// a failing plugin is reported as one line, and krun-core logs the Health
// error as the reason of "plugin lost; restarting it" (WARN, every
// restart) and, in run, as the device's failure. A panic in a plugin's
// Handle makes that error the whole goroutine dump (backend.recovered puts
// debug.Stack() in the error's text), about 3 KB over 30 lines in
// krun-core's log per restart. pluginhost makes Shutdown's flush error
// oneLine, but not Health's.
//
// From review, helper-103; fixed: a recovered panic is a *PanicError whose
// text is one line (the stack goes into the ring failure's log line), the
// SDK's Health error names the queue once, and pluginhost keeps the first
// line of whatever Health says.
func TestHandlePanicHealthErrorIsOneLine(t *testing.T) {
	s, _ := newTestServer(&devPlugin{dev: panicBlk{}})
	if _, err := s.Configure(context.Background(), &pluginpb.ConfigureRequest{SandboxOff: true}); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.state = pluginpb.HealthResponse_STATE_SERVING // as Start does
	s.mu.Unlock()
	sock := filepath.Join(t.TempDir(), "blk.sock")
	backendtest.Serve(t, s.backend, sock)
	b, err := testguest.DialBlk(sock, testguest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_ = b.Read(ctx, 0, make([]byte, 512)) // never answered: the ring failed
	deadline := time.Now().Add(5 * time.Second)
	for {
		r, err := s.Health(context.Background(), &pluginpb.HealthRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if r.State == pluginpb.HealthResponse_STATE_FAILED {
			if strings.Contains(r.Error, "\n") || len(r.Error) > 300 {
				t.Fatalf("Health error is %d bytes over %d lines, want one line naming the panic:\n%s",
					len(r.Error), strings.Count(r.Error, "\n")+1, r.Error)
			}
			if want := "queue 0 failed: panic in ring processing: plugin bug: index out of range"; r.Error != want {
				t.Errorf("Health error %q, want %q", r.Error, want)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Health still %v", r.State)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
