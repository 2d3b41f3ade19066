package main

import (
	"fmt"
	"io"
)

// imgCommand is not written yet; its owner replaces this file.
func imgCommand(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "krun-core img: not implemented yet")
	return 1
}
