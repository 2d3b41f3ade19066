// Package vhostuser implements the vhost-user wire protocol (QEMU
// docs/interop/vhost-user.rst): request codes, the message header, the
// payload structures with strict encoders and decoders, per-request
// validation rules, and Conn, a unix-socket connection that carries messages
// together with file descriptors (SCM_RIGHTS).
//
// Everything received is treated as hostile: payload sizes are exact per
// request, payloads are bounded (MaxPayloadSize), and at most MaxFDs file
// descriptors are accepted per message.
package vhostuser

import "fmt"

// Request is a vhost-user request code (front-end to back-end).
type Request uint32

// Front-end request codes.
const (
	GetFeatures         Request = 1
	SetFeatures         Request = 2
	SetOwner            Request = 3
	ResetOwner          Request = 4
	SetMemTable         Request = 5
	SetLogBase          Request = 6
	SetLogFD            Request = 7
	SetVringNum         Request = 8
	SetVringAddr        Request = 9
	SetVringBase        Request = 10
	GetVringBase        Request = 11
	SetVringKick        Request = 12
	SetVringCall        Request = 13
	SetVringErr         Request = 14
	GetProtocolFeatures Request = 15
	SetProtocolFeatures Request = 16
	GetQueueNum         Request = 17
	SetVringEnable      Request = 18
	SendRARP            Request = 19
	NetSetMTU           Request = 20
	SetBackendReqFD     Request = 21
	IOTLBMsg            Request = 22
	SetVringEndian      Request = 23
	GetConfig           Request = 24
	SetConfig           Request = 25
	CreateCryptoSession Request = 26
	CloseCryptoSession  Request = 27
	PostcopyAdvise      Request = 28
	PostcopyListen      Request = 29
	PostcopyEnd         Request = 30
	GetInflightFD       Request = 31
	SetInflightFD       Request = 32
	GPUSetSocket        Request = 33
	ResetDevice         Request = 34
	VringKick           Request = 35
	GetMaxMemSlots      Request = 36
	AddMemReg           Request = 37
	RemMemReg           Request = 38
	SetStatus           Request = 39
	GetStatus           Request = 40
)

var requestNames = [...]string{
	GetFeatures:         "GET_FEATURES",
	SetFeatures:         "SET_FEATURES",
	SetOwner:            "SET_OWNER",
	ResetOwner:          "RESET_OWNER",
	SetMemTable:         "SET_MEM_TABLE",
	SetLogBase:          "SET_LOG_BASE",
	SetLogFD:            "SET_LOG_FD",
	SetVringNum:         "SET_VRING_NUM",
	SetVringAddr:        "SET_VRING_ADDR",
	SetVringBase:        "SET_VRING_BASE",
	GetVringBase:        "GET_VRING_BASE",
	SetVringKick:        "SET_VRING_KICK",
	SetVringCall:        "SET_VRING_CALL",
	SetVringErr:         "SET_VRING_ERR",
	GetProtocolFeatures: "GET_PROTOCOL_FEATURES",
	SetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	GetQueueNum:         "GET_QUEUE_NUM",
	SetVringEnable:      "SET_VRING_ENABLE",
	SendRARP:            "SEND_RARP",
	NetSetMTU:           "NET_SET_MTU",
	SetBackendReqFD:     "SET_BACKEND_REQ_FD",
	IOTLBMsg:            "IOTLB_MSG",
	SetVringEndian:      "SET_VRING_ENDIAN",
	GetConfig:           "GET_CONFIG",
	SetConfig:           "SET_CONFIG",
	CreateCryptoSession: "CREATE_CRYPTO_SESSION",
	CloseCryptoSession:  "CLOSE_CRYPTO_SESSION",
	PostcopyAdvise:      "POSTCOPY_ADVISE",
	PostcopyListen:      "POSTCOPY_LISTEN",
	PostcopyEnd:         "POSTCOPY_END",
	GetInflightFD:       "GET_INFLIGHT_FD",
	SetInflightFD:       "SET_INFLIGHT_FD",
	GPUSetSocket:        "GPU_SET_SOCKET",
	ResetDevice:         "RESET_DEVICE",
	VringKick:           "VRING_KICK",
	GetMaxMemSlots:      "GET_MAX_MEM_SLOTS",
	AddMemReg:           "ADD_MEM_REG",
	RemMemReg:           "REM_MEM_REG",
	SetStatus:           "SET_STATUS",
	GetStatus:           "GET_STATUS",
}

// String returns the request's name without the VHOST_USER_ prefix.
func (r Request) String() string {
	if int(r) < len(requestNames) && requestNames[r] != "" {
		return requestNames[r]
	}
	return fmt.Sprintf("REQUEST_%d", uint32(r))
}

// Header flag bits.
const (
	// Version is the only protocol version (lower two flag bits).
	Version     uint32 = 0x1
	VersionMask uint32 = 0x3
	// FlagReply marks a reply from the back-end.
	FlagReply uint32 = 1 << 2
	// FlagNeedReply asks for a REPLY_ACK (only with ProtocolReplyAck).
	FlagNeedReply uint32 = 1 << 3
	// knownFlags are all the bits a valid header may carry.
	knownFlags = VersionMask | FlagReply | FlagNeedReply
)

// Virtio and vhost-user feature bits (GET_FEATURES / SET_FEATURES).
const (
	FeatureNotifyOnEmpty    uint64 = 1 << 24
	FeatureRingIndirectDesc uint64 = 1 << 28 // VIRTIO_RING_F_INDIRECT_DESC
	FeatureRingEventIdx     uint64 = 1 << 29 // VIRTIO_RING_F_EVENT_IDX
	FeatureProtocolFeatures uint64 = 1 << 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FeatureVersion1         uint64 = 1 << 32 // VIRTIO_F_VERSION_1
	FeatureAccessPlatform   uint64 = 1 << 33 // VIRTIO_F_ACCESS_PLATFORM (IOMMU)
	FeatureRingPacked       uint64 = 1 << 34 // VIRTIO_F_RING_PACKED
	FeatureLogAll           uint64 = 1 << 26 // VHOST_F_LOG_ALL
)

// BackendRequest is a message a back-end sends on the back-end request
// channel, the socket the front-end gave it with SET_BACKEND_REQ_FD.
type BackendRequest uint32

// Back-end requests.
const (
	// BackendConfigChangeMsg (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, no
	// payload): the device's config space changed on its own.
	BackendConfigChangeMsg BackendRequest = 2
)

// Protocol feature bits (GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES).
const (
	ProtocolMQ                  uint64 = 1 << 0
	ProtocolLogSHMFD            uint64 = 1 << 1
	ProtocolRARP                uint64 = 1 << 2
	ProtocolReplyAck            uint64 = 1 << 3
	ProtocolMTU                 uint64 = 1 << 4
	ProtocolBackendReq          uint64 = 1 << 5
	ProtocolCrossEndian         uint64 = 1 << 6
	ProtocolCryptoSession       uint64 = 1 << 7
	ProtocolPagefault           uint64 = 1 << 8
	ProtocolConfig              uint64 = 1 << 9
	ProtocolBackendSendFD       uint64 = 1 << 10
	ProtocolHostNotifier        uint64 = 1 << 11
	ProtocolInflightSHMFD       uint64 = 1 << 12
	ProtocolResetDevice         uint64 = 1 << 13
	ProtocolInbandNotifications uint64 = 1 << 14
	ProtocolConfigureMemSlots   uint64 = 1 << 15
	ProtocolStatus              uint64 = 1 << 16
)

// Limits enforced on every message.
const (
	// HeaderSize is the size of the request/flags/size header.
	HeaderSize = 12
	// MaxPayloadSize bounds any payload. The largest legal payload is a
	// SET_MEM_TABLE with MaxMemTableRegions regions (264 bytes) or a config
	// space access (12+MaxConfigSize bytes).
	MaxPayloadSize = 4096
	// MaxFDs is the most file descriptors one message may carry.
	MaxFDs = 8
	// MaxMemTableRegions is the most regions in one SET_MEM_TABLE.
	MaxMemTableRegions = 8
	// MaxMemSlots is the most regions a back-end holds with
	// CONFIGURE_MEM_SLOTS (ADD_MEM_REG); GET_MAX_MEM_SLOTS reports it.
	MaxMemSlots = 509
	// MaxConfigSize bounds a GET_CONFIG/SET_CONFIG access.
	MaxConfigSize = 256
	// MaxQueues is the largest ring index + 1 expressible in the 8-bit
	// index of SET_VRING_KICK/CALL/ERR.
	MaxQueues = 256
)

// Bits of the u64 payload of SET_VRING_KICK, SET_VRING_CALL and
// SET_VRING_ERR.
const (
	VringIdxMask  uint64 = 0xff
	VringNoFDFlag uint64 = 1 << 8
)

// VringFlagLog is the only defined SET_VRING_ADDR flag (VHOST_VRING_F_LOG).
const VringFlagLog uint32 = 1 << 0

// Config access flags (GET_CONFIG/SET_CONFIG).
const (
	ConfigFlagWritable  uint32 = 0
	ConfigFlagMigration uint32 = 1
)
