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

// OptReadOnly ("on" or "off") is the read-only switch of disks and shared
// directories.
const OptReadOnly = "readonly"
