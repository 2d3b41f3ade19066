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
// once, and e2e_ok ends early with success. A nested-KVM script bounds
// each inner run with e2e_bounded SECONDS LOG CMD... (or calls
// e2e_nested_hang "what" itself): an inner guest that makes no progress is
// reported as a nested hang, and NestedKVM runs the outer VM once more
// (nested SVM under TCG sometimes leaves an inner guest idle for good on a
// loaded machine); so does an outer guest silent for 100 s, heartbeat
// included, and an outer kernel that panics before the verdict (a
// recursive fault of TCG's nested SVM seen in CI) (NestedOptions.Tries).
// The outer kernel runs with a periodic
// tick (nohz=off highres=off): with a one-shot tick it lost its timer for
// good under nested SVM now and then. The nonce is unique per
// initramfs (Initramfs.ResultMarker), so a nested guest's verdict echoed on
// the outer console never counts as the outer one's.
//
// Run fails the test (printing the console's last 80 lines, the path of a
// file holding all of it, and QEMU's stderr) when the guest reports fail,
// prints no verdict, panics, or exceeds Options.Timeout (default 120 s;
// QEMU is then killed). QEMU is also killed when the test ends. Under go
// test -v or with KRUN_E2E_CONSOLE=1 the console is written to the test log
// line by line as it prints, stamped with the seconds since QEMU started.
//
// Interactive tests use Start, Expect, Send and Wait instead of Run:
//
//	ib.SetInit(`PS1='guest$ ' sh -i`)          // a shell on the serial console
//	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib})
//	if err := vm.Start(); err != nil { t.Fatal(err) }
//	vm.MustExpect(`guest\$ `, time.Minute)
//	vm.Send("cat /sys/block/vda/size\n")
//	m := vm.MustExpect(`(\d+)\r?\n`, time.Minute) // m[1] is the first group
//	vm.Send("exit\n")                           // script ends: verdict ok
//	r, err := vm.Wait()
//
// Expect matches a regexp against output after the previous match and may
// match as soon as part of a line has arrived: end patterns with \r?\n when
// the last group is open-ended. The serial line echoes what Send types.
//
// Result carries BootTime (QEMU start to /init), ReadyTime (modules
// loaded), Total and the guest's own uptime at /init. Typical figures on
// the 2-core CI machine (TCG, one vCPU): /init after 2.5-3.5 s, a simple
// test 3-4 s in all; two to three times that when the machine is loaded.
//
// # Kernel image
//
// Require also extracts the uncompressed ELF kernel from the bzImage
// (Kernel.Vmlinux, cached) and VMs boot it through QEMU's PVH entry, which
// skips the decompression that takes about 3 s under TCG. Options.BootBzImage
// boots Kernel.Vmlinuz instead. Both files can be given to an inner VMM.
//
// # Prebuilt archives
//
// Options.Initrd boots an initramfs built elsewhere (guest/initramfs's
// krun-init archive, in e2e/init) instead of Options.Initramfs. Such a
// guest prints no verdict: Wait succeeds when QEMU exits by itself, and
// Result.ExitCode is QEMU's exit status (with isa-debug-exit:
// (value<<1 | 1) & 0xff).
//
// # Modules
//
// The module resolver and the cpio writer live in guest/initramfs/kmod and
// guest/initramfs/cpio, shared with the production initramfs builder.
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
// # Host programs in the guest
//
// BuildStatic(t, importPath) builds a Go main package with CGO_ENABLED=0
// (e.g. cmd/krun-core or a plugin) for AddFile. AddHostBinary copies a
// dynamically linked host program with the libraries ldd lists.
//
// # Nested KVM
//
// NestedKVM (or NewNestedVM, to add devices or files first) boots an outer
// guest with -cpu max under TCG, whose emulated AMD CPU has SVM and NPT,
// loads kvm_amd with its dependencies (irqbypass, kvm, ccp) so /dev/kvm
// appears, checks it, and runs NestedOptions.Script. Put the inner payload
// in NestedOptions.Payload: a static krun-core from BuildStatic, the inner
// kernel and an inner initramfs built with this package (InnerGuest places
// both at /nested/vmlinuz and /nested/initramfs.cpio; add
// File{Dst: "/nested/vmlinux", Src: a.Kernel.Vmlinux} for the ELF kernel),
// disk images. The script checks the inner verdict by grepping the inner
// console for the inner Initramfs.ResultMarker() + " ok".
//
//	inner := a.NewInitramfs()
//	inner.AddModules(a.Kernel, "virtio_mmio", "virtio_blk")
//	inner.SetInit(`[ -b /dev/vda ]`)
//	payload := append(vmtest.InnerGuest(t, a, inner, "/nested"),
//		vmtest.File{Dst: "/bin/krun-core", Src: vmtest.BuildStatic(t, ".../cmd/krun-core"), Mode: 0o755})
//	vmtest.NestedKVM(t, a, vmtest.NestedOptions{Payload: payload, Script: `
//		krun-core run --kernel /nested/vmlinuz --initrd /nested/initramfs.cpio ... > /tmp/inner.log 2>&1 || true
//		cat /tmp/inner.log
//		grep -q '` + inner.ResultMarker() + ` ok' /tmp/inner.log`})
//
// The outer guest gets 2 GiB by default (memfd-backed and touched lazily,
// so it costs the host only what is used). Measured: an inner QEMU -accel
// kvm guest with 256 MiB runs fine in a 512 MiB outer guest; the outer
// kernel with busybox uses about 70 MiB plus the payload. Under this double
// emulation the inner Linux boots to /init in about 3-5 s of guest uptime and
// a whole inner run takes 7-12 s (slower under load), so nested tests keep
// the 300 s default timeout. The internal/kvmprobe program (KVMProbePackage)
// runs a few real-mode instructions through /dev/kvm as a quick check.
package vmtest
