//go:build !amd64

package main

import "errors"

func ioportWrite(port uint16, val uint8) error {
	return errors.New("port I/O instructions exist only on x86")
}
