package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// loadModules loads the modules listed (one path per line) in list, in
// order, with finit_module. A module already loaded (EEXIST) is skipped.
// The files are deleted afterwards: the initramfs lives in RAM.
func loadModules(log *logger, list string) error {
	b, err := os.ReadFile(list)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read module list: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	n := 0
	for sc.Scan() {
		p := strings.TrimSpace(sc.Text())
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		if err := loadModule(p); err != nil {
			return err
		}
		n++
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read module list: %w", err)
	}
	if n > 0 {
		log.Printf("loaded %d modules", n)
	}
	if err := os.RemoveAll("/lib/modules"); err != nil {
		log.Printf("free module files: %v", err)
	}
	return nil
}

func loadModule(p string) error {
	name := strings.TrimSuffix(filepath.Base(p), ".ko")
	f, err := os.Open(p)
	if err != nil {
		return fmt.Errorf("load module %s: %w", name, err)
	}
	defer f.Close()
	for {
		err = unix.FinitModule(int(f.Fd()), "", 0)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil && err != unix.EEXIST {
		return fmt.Errorf("load module %s: finit_module: %w", name, err)
	}
	return nil
}
