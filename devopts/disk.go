package devopts

import (
	"errors"
	"strconv"
)

// Names of the files and options a disk plugin (blk-raw, blk-qcow2) is
// configured with. Backing files are numbered from the image downwards:
// backing.0 is the image's backing file, backing.1 that file's backing, ...
const (
	FileImage    = "image"     // the image, O_RDWR or O_RDONLY (readonly=on)
	FileDataFile = "data-file" // qcow2 external data file, same mode as the image
	// FileBackingPrefix + N names backing file N, always O_RDONLY.
	FileBackingPrefix = "backing."

	OptFormat  = "format"   // "raw" or "qcow2"
	OptMaxSize = "max-size" // decimal bytes; qcow2 only
	// OptQueues is the number of request queues offered, 1..MaxDiskQueues
	// (decimal); unset, the plugin's default (8). A front-end uses as
	// many as it wants up to that (QEMU's vhost-user-blk-pci wants one per
	// vCPU unless num-queues= says otherwise).
	OptQueues     = "queues"
	MaxDiskQueues = 64
	// OptBackingFormat(N) is "backing.N.format": "raw" or "qcow2".

	// The absolute host paths of the files, for messages and for checking
	// a qcow2 image's recorded backing name against the declared file. The
	// plugin never opens them.
	OptPath         = "path"           // the image
	OptDataFilePath = "data-file.path" // the data file
	// OptBackingPath(N) is "backing.N.path".
)

// BackingFile returns the file name of backing file n.
func BackingFile(n int) string { return FileBackingPrefix + strconv.Itoa(n) }

// OptBackingFormat returns the option key holding backing file n's format.
func OptBackingFormat(n int) string { return FileBackingPrefix + strconv.Itoa(n) + ".format" }

// OptBackingPath returns the option key holding backing file n's absolute
// path.
func OptBackingPath(n int) string { return FileBackingPrefix + strconv.Itoa(n) + ".path" }

// MaxBackingChain bounds the declared backing chain.
const MaxBackingChain = 16

// Format names an image format. It is only ever set from configuration:
// nothing in krun-core guesses a format from an image's content.
type Format string

// The formats krun-core serves.
const (
	Raw   Format = "raw"
	QCOW2 Format = "qcow2"
)

// ParseFormat validates a user-supplied format name.
func ParseFormat(s string) (Format, error) {
	switch Format(s) {
	case Raw, QCOW2:
		return Format(s), nil
	case "":
		return "", errors.New("format= is required (raw or qcow2); krun-core never guesses a format")
	}
	return "", errors.New("unknown format " + strconv.Quote(s) + " (want raw or qcow2)")
}
