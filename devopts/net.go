package devopts

// Names of the file and options a net-passt plugin is configured with.
const (
	FilePasst = "passt" // connected stream socket to passt (qemu socket framing)
	OptMAC    = "mac"   // the guest MAC, aa:bb:cc:dd:ee:ff
	OptMTU    = "mtu"   // the device MTU, when set
)

// MTU bounds. passt takes frames of at most 65535 bytes (ETH_MAX_MTU) from
// the guest and resets the whole connection for a longer one, so the
// largest MTU leaves room for the 14-byte Ethernet header.
const (
	PasstMaxFrame = 65535 // the longest frame passt takes from the guest
	MinMTU        = 68
	MaxMTU        = PasstMaxFrame - 14
)
