// Package img holds the end-to-end tests of `krun-core img` against
// qemu-img: a corpus of images made with qemu-img and qemu-io at test time
// is inspected, checked, converted and verified by krun-core (whose image
// parser runs in the sandboxed krun-plugin-img), and the results are
// compared with qemu-img's.
//
// krun-core and krun-plugin-img are built static (CGO_ENABLED=0) into a
// temporary directory once per test run; set KRUN_E2E_BIN_DIR to a
// directory holding both to use prebuilt ones instead. Tests that need
// qemu-img or qemu-io skip when qemu-utils is not installed.
package img
