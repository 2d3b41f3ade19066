// Command chroot-vm runs a program in a microVM whose root file system is a
// host directory: krun-core's Go API doing what libkrun's
// examples/chroot_vm.c does with krun_set_root, krun_set_exec and
// krun_start_enter.
//
//	go build -o chroot-vm ./examples/chroot-vm
//	./chroot-vm ROOT_DIR COMMAND [ARGS...]
//
// It needs a KVM that boots stock kernels (krun-core doctor), a kernel
// ($KRUN_KERNEL, /boot/vmlinuz-$(uname -r) or `make kernel`; it takes no
// --kernel, which vmm's "no kernel" message names for krun-core run), and
// krun-init, krun-plugin-fs-virtio and krun-plugin-console next to it or in
// $KRUN_PLUGIN_DIR (make all builds them into bin/). It exits with the
// program's status.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/vmm"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: chroot-vm ROOT_DIR COMMAND [ARGS...]")
		os.Exit(125)
	}
	os.Exit(run(os.Args[1], os.Args[2:]))
}

func run(root string, argv []string) int {
	log := hclog.New(&hclog.LoggerOptions{Name: "chroot-vm", Level: hclog.Warn})
	ctx := vmm.NewContext(log)
	// krun_set_vm_config: 2 vCPUs, 1 GiB.
	if err := ctx.SetVMConfig(2, 1024); err != nil {
		return fail(err)
	}
	// krun_set_root.
	if err := ctx.SetRoot(root, false); err != nil {
		return fail(err)
	}
	// krun_set_exec: the program, its argv and environment.
	if err := ctx.SetExec(argv[0], argv, []string{"HOME=/root", "TERM=xterm"}); err != nil {
		return fail(err)
	}
	// krun_set_workdir, krun_set_rlimits, krun_set_port_map.
	if err := ctx.SetWorkdir("/"); err != nil {
		return fail(err)
	}
	if err := ctx.SetRlimits([]string{"nofile=4096:8192"}); err != nil {
		return fail(err)
	}
	// Standard I/O: ours (no terminal handling in this example).
	ctx.SetStdio(os.Stdin, os.Stdout, os.Stderr, false)

	// Forward ^C and SIGTERM to the program.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		for s := range sigs {
			ctx.Signal(unix.Signal(s.(syscall.Signal)))
		}
	}()

	// krun_start_enter: boots the VM and returns when the program is done.
	res, err := ctx.Start(context.Background())
	if err != nil {
		return fail(err)
	}
	if !res.HasExitStatus {
		return fail(fmt.Errorf("the guest ended (%s) without the program's status", res.Reason))
	}
	return res.ExitStatus
}

func fail(err error) int {
	fmt.Fprintln(os.Stderr, "chroot-vm:", err)
	return 125
}
