package main

import (
	"fmt"
	"io"
)

// benchCommand is not written yet; its owner replaces this file.
func benchCommand(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "krun-core bench: not implemented yet")
	return 1
}
