// Package fs holds the end-to-end tests of krun-plugin-fs-virtio: QEMU under
// TCG boots Debian's stock kernel with a busybox initramfs, attached with
// vhost-user-fs-pci to `krun-core serve --fs ...`; the guest mounts the tag
// and works on it, and the host checks the directory afterwards. The same
// guest script runs against QEMU's C virtiofsd (/usr/lib/qemu/virtiofsd)
// as the reference. The escape tests drive the served plugin as a hostile
// guest through the Go test guest (testguest + fuseclient), and the
// benchmarks compare the plugin with virtiofsd through that same driver.
//
// The binaries are built static (CGO_ENABLED=0) into a temporary directory
// once per test run; set KRUN_E2E_BIN_DIR to a directory holding krun-core
// and krun-plugin-fs-virtio to use prebuilt ones instead.
package fs
