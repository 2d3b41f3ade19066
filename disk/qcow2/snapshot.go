package qcow2

import (
	"bufio"
	"fmt"
	"io"
	"time"
)

// snapshot is one parsed entry of the snapshot table.
type snapshot struct {
	l1Off       uint64
	l1Size      uint32
	id          string
	name        string
	dateSec     uint32
	dateNsec    uint32
	vmClockNsec uint64
	vmStateSize uint64
	diskSize    uint64
	hasDiskSize bool
	icount      uint64
	hasIcount   bool
}

// SnapshotInfo describes an internal snapshot.
type SnapshotInfo struct {
	ID          string
	Name        string
	Date        time.Time
	VMClock     time.Duration
	VMStateSize uint64
	DiskSize    uint64 // 0 when the image does not record it (version 2)
	ICount      int64  // -1 when not recorded
	L1Size      uint32
}

func (s *snapshot) info() SnapshotInfo {
	si := SnapshotInfo{
		ID:          sanitize(s.id),
		Name:        sanitize(s.name),
		Date:        time.Unix(int64(s.dateSec), int64(s.dateNsec)).UTC(),
		VMClock:     time.Duration(s.vmClockNsec),
		VMStateSize: s.vmStateSize,
		ICount:      -1,
		L1Size:      s.l1Size,
	}
	if s.hasDiskSize {
		si.DiskSize = s.diskSize
	}
	if s.hasIcount {
		si.ICount = int64(s.icount)
	}
	return si
}

// readSnapshots reads and validates the snapshot table. It returns the
// entries and the table's size in bytes.
func readSnapshots(f io.ReaderAt, h *header) ([]snapshot, uint64, error) {
	if h.nbSnapshots == 0 {
		return nil, 0, nil
	}
	limit := uint64(h.fileSize) - h.snapOff // checkTable ensured snapOff < fileSize
	if limit > maxSnapTableBytes {
		limit = maxSnapTableBytes
	}
	r := bufio.NewReaderSize(io.NewSectionReader(f, int64(h.snapOff), int64(limit)), 64<<10)
	snaps := make([]snapshot, 0, min(h.nbSnapshots, 1024))
	var pos uint64
	fixed := make([]byte, 40)
	for i := uint32(0); i < h.nbSnapshots; i++ {
		if _, err := io.ReadFull(r, fixed); err != nil {
			return nil, 0, tableEnd(i, err)
		}
		s := snapshot{
			l1Off:       be.Uint64(fixed[0:]),
			l1Size:      be.Uint32(fixed[8:]),
			dateSec:     be.Uint32(fixed[16:]),
			dateNsec:    be.Uint32(fixed[20:]),
			vmClockNsec: be.Uint64(fixed[24:]),
			vmStateSize: uint64(be.Uint32(fixed[32:])),
		}
		idLen := uint64(be.Uint16(fixed[12:]))
		nameLen := uint64(be.Uint16(fixed[14:]))
		extraLen := uint64(be.Uint32(fixed[36:]))
		if extraLen > maxSnapExtraData {
			return nil, 0, invalidf("snapshot %d: %d bytes of extra data (limit %d)", i, extraLen, maxSnapExtraData)
		}
		if h.version >= 3 && extraLen < 16 {
			return nil, 0, invalidf("snapshot %d: %d bytes of extra data, version 3 needs 16", i, extraLen)
		}
		rest := make([]byte, extraLen+idLen+nameLen)
		if _, err := io.ReadFull(r, rest); err != nil {
			return nil, 0, tableEnd(i, err)
		}
		extra := rest[:extraLen]
		if extraLen >= 8 {
			s.vmStateSize = be.Uint64(extra[0:])
		}
		if extraLen >= 16 {
			s.diskSize = be.Uint64(extra[8:])
			s.hasDiskSize = true
		}
		if extraLen >= 24 {
			s.icount = be.Uint64(extra[16:])
			s.hasIcount = s.icount != ^uint64(0)
		}
		s.id = string(rest[extraLen : extraLen+idLen])
		s.name = string(rest[extraLen+idLen:])
		entry := 40 + extraLen + idLen + nameLen
		pad := (8 - entry%8) % 8
		if pad > 0 && i+1 < h.nbSnapshots {
			// QEMU does not write the padding of the last entry when the
			// table ends the file.
			if _, err := r.Discard(int(pad)); err != nil {
				return nil, 0, tableEnd(i, err)
			}
		}
		pos += entry + pad
		if pos > maxSnapTableBytes {
			return nil, 0, invalidf("snapshot table larger than %d bytes", maxSnapTableBytes)
		}
		if uint64(s.l1Size) > maxL1Bytes/8 {
			return nil, 0, invalidf("snapshot %d: L1 table has %d entries (limit %d)", i, s.l1Size, maxL1Bytes/8)
		}
		if err := h.checkTable(fmt.Sprintf("snapshot %d L1 table", i), s.l1Off, uint64(s.l1Size)*8); err != nil {
			return nil, 0, err
		}
		if s.hasDiskSize && s.diskSize > 1<<63-1 {
			return nil, 0, invalidf("snapshot %d: disk size %d too large", i, s.diskSize)
		}
		snaps = append(snaps, s)
	}
	return snaps, pos, nil
}

func tableEnd(i uint32, err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return invalidf("snapshot table ends inside entry %d (past the end of the file or the %d byte limit)", i, maxSnapTableBytes)
	}
	return fmt.Errorf("read snapshot table entry %d: %w", i, err)
}
