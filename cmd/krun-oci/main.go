// Command krun-oci is an OCI runtime whose containers are krun-core
// microVMs: podman (--runtime), containerd's runc shim (BinaryName) and
// CRI-O (runtime_path) call it as they call runc. See docs/OCI.md.
package main

import (
	"os"

	"github.com/krun-core/krun-core/oci"
)

func main() {
	os.Exit(oci.Main(os.Args[1:], &oci.Env{NewVM: oci.NewVM, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}))
}
