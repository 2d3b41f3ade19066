package main

import (
	"fmt"
	"io"
)

// serveCommand is not written yet; its owner replaces this file.
func serveCommand(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "krun-core serve: not implemented yet")
	return 1
}
