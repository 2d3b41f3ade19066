package main

import (
	"fmt"
	"io"
)

// runCommand is not written yet; its owner replaces this file.
func runCommand(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "krun-core run: not implemented yet")
	return 1
}
