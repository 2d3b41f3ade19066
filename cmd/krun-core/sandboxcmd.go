package main

import (
	"fmt"
	"io"
)

// sandboxCommand is not written yet; its owner replaces this file.
func sandboxCommand(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "krun-core sandbox: not implemented yet")
	return 1
}
