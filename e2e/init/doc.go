// Package kruninit holds the end-to-end tests of krun-init, the guest's
// PID 1 for `krun-core run --root DIR -- CMD`: QEMU (TCG) boots Debian's
// stock kernel with an initramfs from guest/initramfs.Build holding
// krun-init, the config and the virtio modules. The root is a busybox
// directory served by `krun-core serve --fs path=DIR,tag=krun-root` over
// vhost-user-fs-pci; the command's standard I/O is the framed protocol
// (guest/stdioframe) on a virtserialport named krun.stdio whose chardev is
// a unix socket the test speaks on; the exit status comes back through
// QEMU's isa-debug-exit (QEMU exits with (status<<1|1)&0xff, so a status
// of 128 or more is checked modulo 128 there and in full in the EXIT
// frame) and the milestones
// through an isa-debugcon port. QEMU's fw_cfg sits at 0x510-0x511 on the
// pc machine, so the tests move the status ports with the config's "ports"
// (exit 0x501, milestones 0x503). The network test runs passt inside a
// network namespace of its own, attached to QEMU's virtio-net.
package kruninit
