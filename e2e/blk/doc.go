// Package blk holds the end-to-end tests of the block plugins
// (krun-plugin-blk-raw, krun-plugin-blk-qcow2): QEMU under TCG boots
// Debian's stock kernel with a busybox initramfs, attached with
// vhost-user-blk-pci to `krun-core serve --disk ...`, and the host checks the
// images afterwards with its own reads, e2fsck, debugfs and qemu-img.
//
// The binaries are built static (CGO_ENABLED=0) into a temporary directory
// once per test run; set KRUN_E2E_BIN_DIR to a directory holding krun-core
// and the plugins to use prebuilt ones instead.
package blk
