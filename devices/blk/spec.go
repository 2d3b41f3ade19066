package blk

// Constants from the virtio 1.2 specification, section 5.2 (Block Device),
// and Linux include/uapi/linux/virtio_blk.h.

// DeviceID is the virtio device ID of a block device.
const DeviceID = 2

// SectorSize is the unit of every sector number and count in the protocol,
// whatever blk_size says.
const SectorSize = 512

const sectorShift = 9

// Feature bits (section 5.2.3).
const (
	FeatureSizeMax     = 1  // VIRTIO_BLK_F_SIZE_MAX: size_max is valid
	FeatureSegMax      = 2  // VIRTIO_BLK_F_SEG_MAX: seg_max is valid
	FeatureGeometry    = 4  // VIRTIO_BLK_F_GEOMETRY
	FeatureRO          = 5  // VIRTIO_BLK_F_RO: device is read-only
	FeatureBlkSize     = 6  // VIRTIO_BLK_F_BLK_SIZE: blk_size is valid
	FeatureFlush       = 9  // VIRTIO_BLK_F_FLUSH: cache flush command
	FeatureTopology    = 10 // VIRTIO_BLK_F_TOPOLOGY
	FeatureConfigWCE   = 11 // VIRTIO_BLK_F_CONFIG_WCE
	FeatureMQ          = 12 // VIRTIO_BLK_F_MQ: num_queues is valid
	FeatureDiscard     = 13 // VIRTIO_BLK_F_DISCARD
	FeatureWriteZeroes = 14 // VIRTIO_BLK_F_WRITE_ZEROES
)

// Request types (struct virtio_blk_req.type).
const (
	TypeIn          = 0  // VIRTIO_BLK_T_IN: read
	TypeOut         = 1  // VIRTIO_BLK_T_OUT: write
	TypeFlush       = 4  // VIRTIO_BLK_T_FLUSH
	TypeGetID       = 8  // VIRTIO_BLK_T_GET_ID
	TypeGetLifetime = 10 // VIRTIO_BLK_T_GET_LIFETIME (not offered)
	TypeDiscard     = 11 // VIRTIO_BLK_T_DISCARD
	TypeWriteZeroes = 13 // VIRTIO_BLK_T_WRITE_ZEROES
	TypeSecureErase = 14 // VIRTIO_BLK_T_SECURE_ERASE (not offered)
)

// Status values, the last device-writable byte of every request.
const (
	StatusOK     = 0 // VIRTIO_BLK_S_OK
	StatusIOErr  = 1 // VIRTIO_BLK_S_IOERR
	StatusUnsupp = 2 // VIRTIO_BLK_S_UNSUPP
)

// HeaderSize is the size of the request header: le32 type, le32 reserved
// (ioprio), le64 sector.
const HeaderSize = 16

// SegmentSize is the size of one discard / write-zeroes range: le64 sector,
// le32 num_sectors, le32 flags.
const SegmentSize = 16

// FlagUnmap is VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, the only defined flag of
// a discard / write-zeroes range.
const FlagUnmap = 1

// IDBytes is the length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
const IDBytes = 20

// Config space layout (struct virtio_blk_config, little-endian, packed).
const (
	cfgCapacity         = 0  // le64, in 512-byte sectors
	cfgSizeMax          = 8  // le32
	cfgSegMax           = 12 // le32
	cfgGeometry         = 16 // le16 cylinders, u8 heads, u8 sectors
	cfgBlkSize          = 20 // le32
	cfgTopology         = 24 // u8 physical_block_exp, u8 alignment_offset, le16 min_io_size, le32 opt_io_size
	cfgWriteback        = 32 // u8
	cfgNumQueues        = 34 // le16
	cfgMaxDiscardSect   = 36 // le32
	cfgMaxDiscardSeg    = 40 // le32
	cfgDiscardAlign     = 44 // le32
	cfgMaxWriteZeroSect = 48 // le32
	cfgMaxWriteZeroSeg  = 52 // le32
	cfgWriteZeroUnmap   = 56 // u8, then 3 unused bytes
	// ConfigSize is the length of the fields this device fills. Reads
	// beyond it (newer fields: secure erase, zoned) return zeroes.
	ConfigSize = 60
)

// maxConfigRead bounds a config-space access (VHOST_USER_MAX_CONFIG_SIZE).
const maxConfigRead = 256
