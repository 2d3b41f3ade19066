// Command krun-sandbox-exec is the plugin sandbox's trampoline as a binary
// of its own. krun-core's launcher starts it in the plugin's namespaces; it
// applies the sandbox to itself and execs the plugin binary, so that the
// plugin's first instruction already runs confined (see sandbox.Apply).
// The work happens in the sandbox package's init, which recognizes the
// launcher's argv[0] and environment and never returns.
//
// krun-core uses it when it is installed next to the krun-core executable;
// otherwise krun-core re-executes itself as the trampoline. Being small, it
// starts faster than krun-core (docs/BENCHMARKS.md). It must come from the
// same build as krun-core: the launcher's settings carry a version, and a
// mismatch stops the launch.
package main

import (
	"fmt"
	"os"

	_ "github.com/krun-core/krun-core/sandbox" // the trampoline runs in its init
)

func main() {
	fmt.Fprintln(os.Stderr, "krun-sandbox-exec: the plugin sandbox's trampoline; only krun-core starts it")
	os.Exit(2)
}
