// Package imgserver is the plugin side of `krun-core img`: the ImageTool
// gRPC service (proto/imagepb) that krun-plugin-img serves, and the image
// operations behind it.
//
// The plugin process is handed every file it may touch as an inherited fd
// (3, 4, ...). Open names them and applies the sandbox (sandbox.Restrict
// with the block-device profile: positioned I/O, truncate and sync on the
// handed fds, no file system access at all) before any other call can read
// a byte; every operation then works on those fds only. An image's backing
// file or data file is never opened here: the host declares and opens
// them, and disk/qcow2 compares the names the image records with the
// declared paths.
package imgserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sync"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/krun-core/krun-core/pluginsdk"
	"github.com/krun-core/krun-core/proto/imagepb"
	"github.com/krun-core/krun-core/sandbox"
)

// Policy is the image plugin's sandbox: the block profile (the same system
// calls as krun-plugin-blk-*), no directories.
func Policy() sandbox.Policy {
	p, _ := sandbox.DefaultPolicy("img", -1)
	return p
}

// Main runs the plugin until the host disconnects, then exits the process.
func Main() {
	os.Exit(serve(os.Stderr))
}

func serve(stderr io.Writer) int {
	log := pluginsdk.NewLogger(stderr)
	s := NewServer(log, sandbox.Restrict)
	pluginsdk.ServeService(pluginsdk.Service{
		Handshake: imagepb.Handshake(),
		Name:      imagepb.PluginName,
		Register:  func(g *grpc.Server) { imagepb.RegisterImageToolServer(g, s) },
	}, log)
	return 0
}

// RestrictFunc applies the sandbox (sandbox.Restrict; tests substitute it).
type RestrictFunc func(sandbox.Policy, sandbox.Logger) error

// Server implements imagepb.ImageToolServer.
type Server struct {
	imagepb.UnimplementedImageToolServer
	log      hclog.Logger
	restrict RestrictFunc

	mu     sync.Mutex
	opened bool
	failed error
	files  map[string]*os.File
	busy   bool
}

// NewServer returns a server that restricts itself with restrict on Open.
func NewServer(log hclog.Logger, restrict RestrictFunc) *Server {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Server{log: log, restrict: restrict}
}

// Open names the inherited fds and applies the sandbox.
func (s *Server) Open(_ context.Context, req *imagepb.OpenRequest) (*imagepb.OpenResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.opened || s.failed != nil {
		return nil, status.Error(codes.FailedPrecondition, "Open is called once")
	}
	files, _, err := pluginsdk.InheritedFiles(req.GetFiles(), imagepb.FirstFD, imagepb.MaxFiles)
	if err != nil {
		s.failed = err
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	note := "off at the user's request"
	if req.GetSandboxOff() {
		s.log.Warn("sandbox disabled by the host (--sandbox=off): this plugin parses hostile images unconfined")
	} else {
		if s.restrict == nil {
			s.failed = errors.New("no sandbox available")
			return nil, status.Error(codes.FailedPrecondition, s.failed.Error())
		}
		if err := s.restrict(Policy(), s.log); err != nil {
			s.failed = err
			for _, f := range files {
				f.Close()
			}
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
		note = "restricted, seccomp profile " + string(Policy().Syscalls)
	}
	s.files, s.opened = files, true
	return &imagepb.OpenResponse{Sandbox: note}, nil
}

// begin returns the named files for one operation; operations run one at
// a time.
func (s *Server) begin(names ...string) ([]*os.File, func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.opened {
		return nil, nil, status.Error(codes.FailedPrecondition, "Open was not called")
	}
	if s.busy {
		return nil, nil, status.Error(codes.FailedPrecondition, "another operation is running")
	}
	out := make([]*os.File, len(names))
	for i, n := range names {
		if n == "" {
			continue
		}
		f := s.files[n]
		if f == nil {
			return nil, nil, status.Errorf(codes.InvalidArgument, "no file named %q was handed over", n)
		}
		out[i] = f
	}
	s.busy = true
	return out, func() {
		s.mu.Lock()
		s.busy = false
		s.mu.Unlock()
	}, nil
}

// guard runs op, turning a panic into an error: an image is hostile input
// and the user gets one line, not a stack trace.
func (s *Server) guard(name string, op func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			// The user reads the error; the stack is for a debug log.
			s.log.Debug(name+" panicked", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			err = status.Errorf(codes.Internal, "internal error (panic): %v", r)
		}
	}()
	if err := op(); err != nil {
		if isStatus(err) {
			return err
		}
		return status.Error(codeOf(err), err.Error())
	}
	return nil
}

func isStatus(err error) bool {
	_, ok := err.(interface{ GRPCStatus() *status.Status })
	return ok
}

func codeOf(err error) codes.Code {
	switch {
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, ErrTooLarge):
		return codes.ResourceExhausted
	default:
		return codes.InvalidArgument
	}
}

func (s *Server) Probe(_ context.Context, req *imagepb.ProbeRequest) (resp *imagepb.ProbeResponse, err error) {
	fs, end, err := s.begin(req.GetFile())
	if err != nil {
		return nil, err
	}
	defer end()
	err = s.guard("Probe", func() (err error) {
		resp, err = Probe(fs[0])
		return err
	})
	return resp, err
}

func (s *Server) Info(_ context.Context, req *imagepb.InfoRequest) (resp *imagepb.InfoResponse, err error) {
	fs, end, err := s.begin(req.GetFile())
	if err != nil {
		return nil, err
	}
	defer end()
	err = s.guard("Info", func() (err error) {
		resp, err = Info(fs[0], req.GetFormat())
		return err
	})
	return resp, err
}

func (s *Server) Check(_ context.Context, req *imagepb.CheckRequest) (resp *imagepb.CheckResponse, err error) {
	fs, end, err := s.begin(req.GetFile())
	if err != nil {
		return nil, err
	}
	defer end()
	err = s.guard("Check", func() (err error) {
		resp, err = Check(fs[0], req.GetFormat(), req.GetRepair())
		return err
	})
	return resp, err
}

func (s *Server) Verify(_ context.Context, req *imagepb.VerifyRequest) (resp *imagepb.VerifyResponse, err error) {
	fs, end, err := s.begin(req.GetFile())
	if err != nil {
		return nil, err
	}
	defer end()
	err = s.guard("Verify", func() (err error) {
		resp, err = Verify(fs[0], req.GetFormat(), s.log)
		return err
	})
	return resp, err
}

func (s *Server) Create(_ context.Context, req *imagepb.CreateRequest) (resp *imagepb.CreateResponse, err error) {
	fs, end, err := s.begin(req.GetOutput(), req.GetBackingFile())
	if err != nil {
		return nil, err
	}
	defer end()
	err = s.guard("Create", func() (err error) {
		resp, err = Create(fs[0], fs[1], req)
		return err
	})
	return resp, err
}

func (s *Server) Resize(_ context.Context, req *imagepb.ResizeRequest) (resp *imagepb.ResizeResponse, err error) {
	names := []string{req.GetFile()}
	for _, b := range req.GetBacking() {
		names = append(names, b.GetFile())
	}
	fs, end, err := s.begin(names...)
	if err != nil {
		return nil, err
	}
	defer end()
	err = s.guard("Resize", func() (err error) {
		resp, err = Resize(fs[0], layers(req.GetBacking(), fs[1:]), req)
		return err
	})
	return resp, err
}

func (s *Server) Convert(req *imagepb.ConvertRequest, stream imagepb.ImageTool_ConvertServer) error {
	names := []string{req.GetInput().GetFile(), req.GetOutput(), req.GetDataFile().GetFile()}
	for _, b := range req.GetBacking() {
		names = append(names, b.GetFile())
	}
	fs, end, err := s.begin(names...)
	if err != nil {
		return err
	}
	defer end()
	return s.guard("Convert", func() error {
		job := ConvertJob{
			Input:  Layer{File: fs[0], Format: req.GetInput().GetFormat(), Path: req.GetInput().GetPath()},
			Output: fs[1], OutputFormat: req.GetOutputFormat(),
			Out: OutputOptions{Compress: req.GetCompress(), ClusterSize: req.GetClusterSize(), CompressionType: req.GetCompressionType()},
			Log: s.log,
		}
		if fs[2] != nil {
			job.DataFile = &Layer{File: fs[2], Format: req.GetDataFile().GetFormat(), Path: req.GetDataFile().GetPath()}
		}
		job.Backing = layers(req.GetBacking(), fs[3:])
		res, err := job.Run(stream.Context(), progressSender(stream))
		if err != nil {
			return err
		}
		return stream.Send(res)
	})
}

func (s *Server) Import(req *imagepb.ImportRequest, stream imagepb.ImageTool_ImportServer) error {
	fs, end, err := s.begin(req.GetInput(), req.GetOutput())
	if err != nil {
		return err
	}
	defer end()
	return s.guard("Import", func() error {
		job := ImportJob{
			Input: fs[0], InputFormat: req.GetInputFormat(),
			Output: fs[1], OutputFormat: req.GetOutputFormat(), MaxSize: req.GetMaxSize(),
			Out: OutputOptions{Compress: req.GetCompress(), ClusterSize: req.GetClusterSize(), CompressionType: req.GetCompressionType()},
		}
		res, err := job.Run(stream.Context(), progressSender(stream))
		if err != nil {
			return err
		}
		return stream.Send(res)
	})
}

// layers pairs a request's declared layers with their files, as begin
// returned them (in the same order).
func layers(pb []*imagepb.Layer, files []*os.File) []Layer {
	var out []Layer
	for i, l := range pb {
		out = append(out, Layer{File: files[i], Format: l.GetFormat(), Path: l.GetPath()})
	}
	return out
}

// progressSender sends a progress message at most every 100 ms.
func progressSender(stream interface{ Send(*imagepb.Progress) error }) func(done, total int64) {
	var last time.Time
	return func(done, total int64) {
		if now := time.Now(); now.Sub(last) >= 100*time.Millisecond {
			last = now
			_ = stream.Send(&imagepb.Progress{Done: done, Total: total})
		}
	}
}
