// Command krun-plugin-img is the sandboxed image parser behind
// `krun-core img`. krun-core opens every file an img command needs and
// hands them over as inherited fds; the plugin restricts itself
// (namespaces from the launcher, then rlimits, an empty root, no_new_privs,
// no capabilities, Landlock without any file system access and the block
// seccomp profile) before it reads a byte of them, and serves the
// ImageTool gRPC service (proto/imagepb) over go-plugin. It opens no paths.
package main

import "github.com/krun-core/krun-core/imgtool/imgserver"

func main() { imgserver.Main() }
