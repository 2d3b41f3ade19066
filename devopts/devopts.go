// Package devopts is the vocabulary the host (krun-core's core/devspec and
// core/vmm) and the built-in device plugins (plugins/*) share: plugin
// kinds, the names of the files the host hands a plugin, the option keys
// and values it configures one with, image formats, the fs plugin's option
// parsers, and the console plugin's control records.
//
// It is a leaf: it imports nothing from this module, so both sides can use
// it without the core depending on a device package or a plugin on the
// core. A change of a name here changes the protocol between host and
// plugin (docs/PLUGINS.md, "Versions and compatibility").
package devopts

// Plugin kinds the host dispatches the built-in devices to; the executable
// of kind K is krun-plugin-K.
const (
	KindBlkRaw   = "blk-raw"
	KindBlkQCOW2 = "blk-qcow2"
	KindFS       = "fs-virtio"
	KindNetPasst = "net-passt"
	KindConsole  = "console"
)

// Virtio device IDs of the built-in kinds' devices.
const (
	VirtioNet     = 1
	VirtioBlk     = 2
	VirtioConsole = 3
	VirtioFS      = 26
)

// DeviceType is the virtio device ID a plugin of a built-in kind must
// serve; ok is false for any other kind (a third-party plugin's device is
// its own to name). The host holds a built-in plugin to it: one that parses
// hostile bytes may be compromised, and a blk plugin that served a console
// or a virtio-fs device instead would reach what the user gave another
// device (the command's standard input and output, the root file system).
func DeviceType(kind string) (id uint32, ok bool) {
	switch kind {
	case KindBlkRaw, KindBlkQCOW2:
		return VirtioBlk, true
	case KindFS:
		return VirtioFS, true
	case KindNetPasst:
		return VirtioNet, true
	case KindConsole:
		return VirtioConsole, true
	}
	return 0, false
}

// OptReadOnly ("on" or "off") is the read-only switch of disks and shared
// directories.
const OptReadOnly = "readonly"
