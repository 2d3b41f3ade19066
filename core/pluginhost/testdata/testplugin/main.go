// Command testplugin is a bare go-plugin DevicePlugin server used by the
// pluginhost tests. It does not use pluginsdk, so the host is tested against
// the wire contract alone. KRUN_TEST_MODE selects a behaviour:
//
//	ok        answer every RPC; Stats reports what the process inherited
//	crash     panic inside the Stats RPC
//	hang      never complete the handshake
//	exit      exit with status 3 before the handshake
//	version   offer handshake protocol version 99
//	policy    declare a sandbox policy with a forbidden extra system call
//	huge      answer Stats with a 64 MiB counter name
//	stash     before serving, send its own stdout and stderr (fds 1, 2)
//	          over the vhost-user socket (fd 3) in a message the host never
//	          reads: a compromised plugin keeping go-plugin's pipes open
//	          after its death
//	hugeerr   fail Stats with an 8 MiB status message
//	stdioflood  send the host stdioFloodCount messages on go-plugin's stdio
//	          stream for a channel that does not exist (Stats reports
//	          stdio_sent)
//	brokerflood  send the host, on go-plugin's broker stream, knocks for
//	          brokerFloodCount distinct service ids, each with a 256 KiB
//	          address (a compromised plugin; Stats reports broker_sent)
//	stall     answer everything but Shutdown (its own and go-plugin's
//	          controller Shutdown), which never return: a compromised plugin
//	hugekind  report a kind of hugeText bytes in Describe
//	hugetext  answer Configure with a sandbox summary of two lines, the
//	          second of hugeText ESC bytes, Health with a failure of
//	          hugeText ESC bytes and Shutdown with a flush error of
//	          hugeText bytes
//
// KRUN_TEST_KIND, if set, is the kind Describe reports (else "test"), and
// KRUN_TEST_TYPE the virtio device type Configure reports (else 4).
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/krun-core/krun-core/proto/pluginpb"
)

// pdeathsig is the parent-death signal, read in init: it is a per-thread
// attribute that only the main thread (which init runs on) inherited.
var pdeathsig int32

func init() {
	if err := unix.Prctl(unix.PR_GET_PDEATHSIG, uintptr(unsafe.Pointer(&pdeathsig)), 0, 0, 0); err != nil {
		pdeathsig = -1
	}
}

type server struct {
	pluginpb.UnimplementedDevicePluginServer
	log   hclog.Logger
	files map[string]uint32
}

func (s *server) Describe(context.Context, *pluginpb.DescribeRequest) (*pluginpb.DescribeResponse, error) {
	// The JSON of a sandbox.Policy, written out: this plugin uses nothing
	// of the SDK.
	pol := `{"kind":"test","syscalls":"minimal"}`
	if os.Getenv("KRUN_TEST_MODE") == "policy" {
		pol = `{"kind":"test","syscalls":"minimal","extra_syscalls":[{"name":"ptrace","reason":"to see"}]}`
	}
	kind := "test"
	if k := os.Getenv("KRUN_TEST_KIND"); k != "" {
		kind = k
	}
	if os.Getenv("KRUN_TEST_MODE") == "hugekind" {
		kind = strings.Repeat("k", hugeText)
	}
	return &pluginpb.DescribeResponse{Kind: kind, SdkVersion: "testplugin", PolicyJson: []byte(pol)}, nil
}

func (s *server) Configure(_ context.Context, r *pluginpb.ConfigureRequest) (*pluginpb.ConfigureResponse, error) {
	s.files = r.GetFiles()
	s.log.Info("configured", "options", fmt.Sprint(r.GetOptions()), "sandbox_off", r.GetSandboxOff())
	typ := uint32(4)
	if t, err := strconv.ParseUint(os.Getenv("KRUN_TEST_TYPE"), 10, 32); err == nil {
		typ = uint32(t)
	}
	sandbox := ""
	if os.Getenv("KRUN_TEST_MODE") == "hugetext" {
		sandbox = "restricted\n" + strings.Repeat("\x1b", hugeText)
	}
	return &pluginpb.ConfigureResponse{Device: &pluginpb.DeviceInfo{DeviceType: typ, NumQueues: 1, MaxQueueSize: 256}, Sandbox: sandbox}, nil
}

func (s *server) Stats(context.Context, *pluginpb.StatsRequest) (*pluginpb.StatsResponse, error) {
	if os.Getenv("KRUN_TEST_MODE") == "crash" {
		s.log.Info("about to crash")
		panic("testplugin: crashing in Stats as asked")
	}
	c := map[string]uint64{}
	if os.Getenv("KRUN_TEST_MODE") == "hugeerr" {
		return nil, status.Error(codes.FailedPrecondition, strings.Repeat("e", 8<<20))
	}
	if os.Getenv("KRUN_TEST_MODE") == "huge" {
		c[strings.Repeat("k", 64<<20)] = 1
		return &pluginpb.StatsResponse{Counters: c}, nil
	}
	c["pdeathsig"] = uint64(pdeathsig)
	c["broker_sent"] = uint64(brokerSent.Load())
	c["stdio_sent"] = uint64(stdioSent.Load())
	var st unix.Stat_t
	if unix.Fstat(pluginpb.SocketFD, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK {
		c["fd3_socket"] = 1
	}
	if unix.Fstat(0, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == unix.Mkdev(1, 3) {
		c["stdin_devnull"] = 1
	}
	for name, fd := range s.files {
		b := make([]byte, 1)
		if n, _ := unix.Pread(int(fd), b, 0); n == 1 {
			c["file_"+name] = uint64(b[0])
		}
	}
	if os.Getenv("KRUN_TEST_SECRET") != "" {
		c["host_env_leak"] = 1
	}
	if os.Getenv(plugin.EnvUnixSocketDir) != "" {
		c["socket_dir_env"] = 1
	}
	c["env_count"] = uint64(len(os.Environ()))
	return &pluginpb.StatsResponse{Counters: c}, nil
}

func (s *server) Health(context.Context, *pluginpb.HealthRequest) (*pluginpb.HealthResponse, error) {
	if os.Getenv("KRUN_TEST_MODE") == "hugetext" {
		return &pluginpb.HealthResponse{State: pluginpb.HealthResponse_STATE_FAILED, Error: strings.Repeat("\x1b", hugeText)}, nil
	}
	return &pluginpb.HealthResponse{State: pluginpb.HealthResponse_STATE_CONFIGURED}, nil
}

func (s *server) Shutdown(context.Context, *pluginpb.ShutdownRequest) (*pluginpb.ShutdownResponse, error) {
	if os.Getenv("KRUN_TEST_MODE") == "hugetext" {
		return &pluginpb.ShutdownResponse{FlushError: strings.Repeat("e", hugeText)}, nil
	}
	return &pluginpb.ShutdownResponse{FlushError: os.Getenv("KRUN_TEST_FLUSH_ERROR")}, nil
}

// hugeText is the length of the strings of modes hugekind and hugetext:
// within the host's reply limit (MaxReplyBytes, 1 MiB).
const hugeText = 900 << 10

type devicePlugin struct {
	plugin.NetRPCUnsupportedPlugin
	srv *server
}

func (p devicePlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	pluginpb.RegisterDevicePluginServer(s, p.srv)
	return nil
}

func (devicePlugin) GRPCClient(context.Context, *plugin.GRPCBroker, *grpc.ClientConn) (interface{}, error) {
	return nil, fmt.Errorf("plugin side only")
}

// brokerFloodCount knocks of brokerFloodAddr bytes each: about 100 MiB.
const (
	brokerFloodCount = 400
	brokerFloodAddr  = 256 << 10
)

var brokerSent, stdioSent atomic.Int64

const stdioFloodCount = 20000

// stdioFlood takes over go-plugin's stdio stream and sends StdioData
// (channel=1, data=2) for channel 7, which go-plugin's host side logs as
// a warning each time ("unknown channel, dropping").
func stdioFlood(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if info.FullMethod != "/plugin.GRPCStdio/StreamStdio" {
		return h(srv, ss)
	}
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.VarintType)
	b = protowire.AppendVarint(b, 7)
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendString(b, "x")
	for i := 0; i < stdioFloodCount; i++ {
		m := &emptypb.Empty{}
		m.ProtoReflect().SetUnknown(b)
		if err := ss.SendMsg(m); err != nil {
			return err
		}
		stdioSent.Add(1)
	}
	<-ss.Context().Done()
	return nil
}

// brokerFlood takes over go-plugin's broker stream (the host opens it to
// every plugin) and sends ConnInfo knocks, encoded by hand (go-plugin's
// type is internal): service_id=1, address=3, knock=4{knock=1}.
func brokerFlood(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if info.FullMethod != "/plugin.GRPCBroker/StartStream" {
		return h(srv, ss)
	}
	addr := strings.Repeat("a", brokerFloodAddr)
	for i := 1; i <= brokerFloodCount; i++ {
		var b []byte
		b = protowire.AppendTag(b, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(1000+i))
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendString(b, "unix")
		b = protowire.AppendTag(b, 3, protowire.BytesType)
		b = protowire.AppendString(b, addr)
		knock := protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 1)
		b = protowire.AppendTag(b, 4, protowire.BytesType)
		b = protowire.AppendBytes(b, knock)
		m := &emptypb.Empty{}
		m.ProtoReflect().SetUnknown(b)
		if err := ss.SendMsg(m); err != nil {
			return err
		}
		brokerSent.Add(1)
	}
	<-ss.Context().Done()
	return nil
}

func main() {
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: os.Stderr, JSONFormat: true})
	hs := pluginpb.Handshake()
	switch os.Getenv("KRUN_TEST_MODE") {
	case "hang":
		time.Sleep(time.Hour)
	case "exit":
		fmt.Fprintln(os.Stderr, "testplugin: refusing to start as asked")
		os.Exit(3)
	case "version":
		hs.ProtocolVersion = 99
	}
	if os.Getenv("KRUN_TEST_MODE") == "stash" {
		if err := unix.Sendmsg(pluginpb.SocketFD, []byte{0}, unix.UnixRights(1, 2), nil, 0); err != nil {
			fmt.Fprintln(os.Stderr, "testplugin: stash:", err)
			os.Exit(4)
		}
	}
	log.Info("hello from test plugin", "pid", os.Getpid())
	grpcServer := plugin.DefaultGRPCServer
	if os.Getenv("KRUN_TEST_MODE") == "stall" {
		grpcServer = func(opts []grpc.ServerOption) *grpc.Server {
			stall := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
				if strings.HasSuffix(info.FullMethod, "/Shutdown") {
					select {} // never answer, never exit
				}
				return h(ctx, req)
			}
			return grpc.NewServer(append(opts, grpc.UnaryInterceptor(stall))...)
		}
	}
	if os.Getenv("KRUN_TEST_MODE") == "stdioflood" {
		grpcServer = func(opts []grpc.ServerOption) *grpc.Server {
			return grpc.NewServer(append(opts, grpc.StreamInterceptor(stdioFlood))...)
		}
	}
	if os.Getenv("KRUN_TEST_MODE") == "brokerflood" {
		grpcServer = func(opts []grpc.ServerOption) *grpc.Server {
			return grpc.NewServer(append(opts, grpc.StreamInterceptor(brokerFlood))...)
		}
	}
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: hs,
		Plugins:         plugin.PluginSet{pluginpb.PluginName: devicePlugin{srv: &server{log: log}}},
		GRPCServer:      grpcServer,
		Logger:          log,
	})
}
