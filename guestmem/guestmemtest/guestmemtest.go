// Package guestmemtest gives tests guest memory: one memfd-backed region at
// guest address 0, unmapped when the test ends.
package guestmemtest

import (
	"testing"

	"github.com/krun-core/krun-core/guestmem"
)

// Memory maps size bytes of fresh (zeroed) memfd memory at guest address 0
// for the test, named name in /proc/PID/maps.
func Memory(t testing.TB, name string, size uint64) *guestmem.Memory {
	t.Helper()
	f, err := guestmem.NewMemfd(name, size)
	if err != nil {
		t.Fatal(err)
	}
	m, err := guestmem.Map([]guestmem.Region{{GuestAddr: 0, Size: size, File: f}})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}
