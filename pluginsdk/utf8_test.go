package pluginsdk

// From review (helper sdkreview): text a plugin author's device hands the SDK
// (a counter's name, a Flush or Close error) goes into proto3 string
// fields, which gRPC refuses to marshal unless they are valid UTF-8. Health
// makes its error valid UTF-8 ("a file name in it"); Stats and Shutdown
// do not, so one odd byte makes the whole RPC fail on the wire.

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/krun-core/krun-core/proto/pluginpb"
)

// overGRPC serves s over an in-memory gRPC connection, as go-plugin does
// over its unix socket, and returns the host's client.
func overGRPC(t *testing.T, s *server) pluginpb.DevicePluginClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	g := grpc.NewServer()
	pluginpb.RegisterDevicePluginServer(g, s)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pluginpb.NewDevicePluginClient(conn)
}

// latin1Device counts per backing file, named as the host named it, and
// fails its flush with the host path in the error (a Latin-1 file name).
type latin1Device struct{ fakeDevice }

func (*latin1Device) Counters() map[string]uint64 {
	return map[string]uint64{"reads.caf\xe9.img": 3, "widgets": 7}
}
func (*latin1Device) Flush() error {
	return errors.New("fdatasync /srv/caf\xe9.img: input/output error")
}

func configured(t *testing.T, dev *latin1Device) pluginpb.DevicePluginClient {
	t.Helper()
	s, _ := newTestServer(&devPlugin{dev: dev})
	if _, err := s.Configure(context.Background(), &pluginpb.ConfigureRequest{SandboxOff: true}); err != nil {
		t.Fatal(err)
	}
	return overGRPC(t, s)
}

// TestStatsOddCounterNameKeepsStats: one counter whose name is not
// valid UTF-8 makes Stats fail as a whole (the back-end's q<N>.* counters
// are lost with it); docs/PLUGINS.md says odd counter names are "only
// counted" by serve's SIGUSR1 line.
func TestStatsOddCounterNameKeepsStats(t *testing.T) {
	c := configured(t, &latin1Device{fakeDevice{cfg: []byte{1, 2, 3, 4}}})
	r, err := c.Stats(context.Background(), &pluginpb.StatsRequest{})
	if err != nil {
		t.Fatalf("Stats failed on the wire because of one counter's name: %v", err)
	}
	if r.Counters["widgets"] != 7 || r.Counters["q0.requests"] != 0 {
		t.Fatalf("counters %v", r.Counters)
	}
	if _, ok := r.Counters["q0.kicks"]; !ok {
		t.Fatalf("back-end counters missing: %v", r.Counters)
	}
}

// TestShutdownFlushErrorReachesHost: a flush error that names a
// non-UTF-8 path makes the Shutdown reply unmarshalable: the host gets
// "grpc: error while marshaling" instead of the flush error, the one
// thing Shutdown reports.
func TestShutdownFlushErrorReachesHost(t *testing.T) {
	c := configured(t, &latin1Device{fakeDevice{cfg: []byte{1, 2, 3, 4}}})
	r, err := c.Shutdown(context.Background(), &pluginpb.ShutdownRequest{})
	if err != nil {
		t.Fatalf("Shutdown failed on the wire, the flush error is lost: %v", err)
	}
	if !strings.Contains(r.FlushError, "fdatasync /srv/caf") || !strings.Contains(r.FlushError, "input/output error") {
		t.Fatalf("flush error %q", r.FlushError)
	}
}
