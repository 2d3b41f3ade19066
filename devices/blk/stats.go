package blk

import "sync/atomic"

// Stats is a snapshot of the device's counters.
type Stats struct {
	// Requests by type (counted whether or not they succeed).
	Reads, Writes, Flushes, GetIDs, Discards, WriteZeroes uint64
	// Bytes moved by successful reads and writes.
	BytesRead, BytesWritten uint64

	// Failed requests, by reason.
	NoStatus        uint64 // no device-writable byte: nothing could be reported
	ShortHeader     uint64 // fewer than 16 readable bytes
	BadLength       uint64 // data not a multiple of 512, or ranges not a multiple of 16
	OutOfRange      uint64 // sector range beyond capacity (or overflowing)
	TooManySegments uint64 // more discard/write-zeroes ranges than max_*_seg
	TooManySectors  uint64 // a range longer than max_*_sectors
	BadFlags        uint64 // unknown range flags, or unmap on discard (UNSUPP)
	ShortID         uint64 // GET_ID buffer under 20 bytes
	ReadOnly        uint64 // write, discard or write-zeroes on a read-only disk
	Unsupported     uint64 // unknown type, or a feature the driver did not negotiate
	TooLarge        uint64 // a chain over 4 GiB
	IOErrors        uint64 // the disk failed
}

// Map returns the counters by name, for the plugin Stats RPC.
func (s Stats) Map() map[string]uint64 {
	return map[string]uint64{
		"reads": s.Reads, "writes": s.Writes, "flushes": s.Flushes, "get_ids": s.GetIDs,
		"discards": s.Discards, "write_zeroes": s.WriteZeroes,
		"bytes_read": s.BytesRead, "bytes_written": s.BytesWritten,
		"err_no_status": s.NoStatus, "err_short_header": s.ShortHeader, "err_bad_length": s.BadLength,
		"err_out_of_range": s.OutOfRange, "err_too_many_segments": s.TooManySegments,
		"err_too_many_sectors": s.TooManySectors, "err_bad_flags": s.BadFlags, "err_short_id": s.ShortID,
		"err_read_only": s.ReadOnly, "err_unsupported": s.Unsupported, "err_too_large": s.TooLarge,
		"err_io": s.IOErrors,
	}
}

type counters struct {
	reads, writes, flushes, getIDs, discards, writeZeroes atomic.Uint64
	bytesRead, bytesWritten                               atomic.Uint64

	noStatus, shortHeader, badLength, outOfRange, tooManySegments atomic.Uint64
	tooManySectors, badFlags, shortID, readOnly, unsupported      atomic.Uint64
	tooLarge, ioErrors                                            atomic.Uint64
}

// Stats returns the current counters.
func (d *Device) Stats() Stats {
	c := &d.stats
	return Stats{
		Reads: c.reads.Load(), Writes: c.writes.Load(), Flushes: c.flushes.Load(),
		GetIDs: c.getIDs.Load(), Discards: c.discards.Load(), WriteZeroes: c.writeZeroes.Load(),
		BytesRead: c.bytesRead.Load(), BytesWritten: c.bytesWritten.Load(),
		NoStatus: c.noStatus.Load(), ShortHeader: c.shortHeader.Load(), BadLength: c.badLength.Load(),
		OutOfRange: c.outOfRange.Load(), TooManySegments: c.tooManySegments.Load(),
		TooManySectors: c.tooManySectors.Load(), BadFlags: c.badFlags.Load(), ShortID: c.shortID.Load(),
		ReadOnly: c.readOnly.Load(), Unsupported: c.unsupported.Load(), TooLarge: c.tooLarge.Load(),
		IOErrors: c.ioErrors.Load(),
	}
}

// count bumps the counter of a request failure reason.
func (d *Device) count(reason error) {
	c := &d.stats
	switch reason {
	case errNoStatus:
		c.noStatus.Add(1)
	case errShortHeader:
		c.shortHeader.Add(1)
	case errBadLength:
		c.badLength.Add(1)
	case errOutOfRange:
		c.outOfRange.Add(1)
	case errTooManySegs:
		c.tooManySegments.Add(1)
	case errTooManySectors:
		c.tooManySectors.Add(1)
	case errBadFlags:
		c.badFlags.Add(1)
	case errShortID:
		c.shortID.Add(1)
	case errReadOnly:
		c.readOnly.Add(1)
	case errUnsupported:
		c.unsupported.Add(1)
	case errTooLarge:
		c.tooLarge.Add(1)
	}
	if d.log.IsDebug() {
		d.log.Debug("request failed", "reason", reason)
	}
}
