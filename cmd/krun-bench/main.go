// Command krun-bench benchmarks a vhost-user back-end (krun-core serve,
// qemu-storage-daemon, ...) with the Go test guest (testguest): block
// workloads (blk) and a TCP stream through passt (net). It is a test and
// measurement tool, built apart from krun-core so that the production
// binary does not carry the test guest (docs/BENCHMARKS.md).
package main

import "os"

func main() {
	os.Exit(benchCommand(os.Args[1:], os.Stdout, os.Stderr))
}
