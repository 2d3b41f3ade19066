// Package vhostuser holds the end-to-end tests of `krun-core run
// --vhost-user`: external vhost-user back-ends that krun-core did not start
// (qemu-storage-daemon, QEMU's C virtiofsd, a `krun-core serve` started on
// its own) attached to the guest of krun-core run through the core's
// virtio-mmio transport. The inner guest reads what the host put on each
// disk and share and writes its own; the host checks what it wrote.
//
// krun-core run needs a KVM that boots stock kernels; where the host has
// none (vmtest.DirectKVM) the test runs inside a QEMU TCG guest with
// nested SVM, with the back-ends and their libraries copied into it.
package vhostuser
