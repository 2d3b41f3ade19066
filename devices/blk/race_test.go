//go:build race

package blk_test

// The race detector's instrumentation allocates: allocation counts are
// meaningless under it.
func init() { raceEnabled = true }
