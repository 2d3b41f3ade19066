// Package vmtest is the end-to-end test harness: it boots Debian's stock
// kernel with a generated busybox initramfs in QEMU (TCG, no KVM needed) and
// reports the guest's verdict.
//
// # Assets
//
// Require downloads, once, Debian's kernel package (the one
// linux-image-amd64 depends on) and busybox-static with `apt-get download`,
// unpacks them with dpkg-deb into $KRUN_TEST_CACHE (default
// ~/.cache/krun-core-test) and reuses them on later runs. Concurrent test
// processes serialise on a lock file; unpacked trees appear by atomic
// rename. Nothing downloaded ever lands in the repository.
//
// Require skips in -short mode, without qemu-system-x86_64, or on a host
// with neither apt-get nor a cached kernel. Where QEMU is installed, failing
// to get the assets fails the test; if apt's package lists are missing the
// error says to run `apt-get update` (see ErrNoPackageLists).
//
// # Writing a test
//
//	func TestBlkGuest(t *testing.T) {
//		a := vmtest.Require(t)                      // skip or fetch kernel+busybox
//		ib := a.NewInitramfs()                      // busybox + applet links
//		ib.AddModules(a.Kernel, "virtio_pci", "virtio_blk", "ext4") // deps added, insmod in order
//		ib.AddFile("/bin/tool", toolPath, 0o755)   // any host file
//		ib.SetInit(`
//			dd if=/dev/vda bs=512 count=1 | grep -q hello
//			[ "$(cat /sys/block/vda/size)" = 2048 ] || e2e_fail "wrong size"
//		`)
//		vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib})
//		vm.AddVhostUserBlk(socketPath)             // back-end must already listen
//		r := vm.Run()                               // fails the test with the console unless "ok"
//		_ = r.Console
//	}
//
// The script runs under `sh -e` after /init has mounted /proc, /sys,
// devtmpfs on /dev, devpts and /dev/shm, and loaded the modules. When it
// exits 0 the guest prints "KRUN-E2E-RESULT <nonce>: ok" and powers off; a
// non-zero exit reports "fail test script exited with status N". Inside the
// script, e2e_fail "reason" reports failure with a reason and powers off at
// once, and e2e_ok ends early with success. The nonce is unique per
// initramfs (Initramfs.ResultMarker), so a nested guest's verdict echoed on
// the outer console never counts as the outer one's.
//
// Run fails the test (printing the whole console and QEMU's stderr) when the
// guest reports fail, prints no verdict, panics, or exceeds Options.Timeout
// (default 120 s; QEMU is then killed). For interactive tests use Start,
// Expect (a regexp, matched against output after the previous match), Send
// (console input) and Wait instead of Run. The console is also written to
// the test log line by line with timestamps since QEMU started.
//
// # Modules
//
// Debian 12's kernel ships uncompressed .ko files and no modules.dep
// (depmod runs at install time), so AddModules reads each module's
// .modinfo "depends=" and "softdep=pre:" fields and orders insmod lines with
// every module after its dependencies. Compressed modules (.ko.xz, .ko.zst,
// .ko.gz, as newer kernels ship them) are decompressed at build time because
// busybox insmod cannot. Built-in modules are skipped. A modules.dep for the
// included modules is generated too, so busybox modprobe works in the
// guest. Module parameters go through SetModuleParams (busybox insmod does
// not read /proc/cmdline). ext2 has no module of its own on this kernel
// (CONFIG_EXT4_USE_FOR_EXT2): load "ext4". Note that the kernel is built
// without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so virtio_mmio's device=
// parameter does not exist; virtio-mmio devices must be described by ACPI
// (_HID LNRO0005) or a device tree.
//
// # Devices
//
// Guest RAM is always a shared memfd (memory-backend-memfd,share=on with a
// NUMA node), as vhost-user requires. AddVhostUserBlk, AddVhostUserFS and
// AddVhostUserNet attach PCI front-ends to a back-end's unix socket (load
// virtio_pci plus virtio_blk / virtiofs / virtio_net in the guest);
// AddDrive attaches QEMU's own virtio-blk for comparison; AddArgs passes
// anything else.
//
// # Nested KVM
//
// NestedKVM boots an outer guest with -cpu max under TCG (emulated AMD SVM),
// loads kvm_amd and its dependencies so /dev/kvm appears, and runs a script
// that can start an inner VM from payload files placed in the outer
// initramfs (a static krun-core binary, a kernel, an inner initramfs built
// with this package, disk images).
package vmtest
