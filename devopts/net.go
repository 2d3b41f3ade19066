package devopts

// Names of the file and options a net-passt plugin is configured with.
const (
	FilePasst = "passt" // connected stream socket to passt (qemu socket framing)
	OptMAC    = "mac"   // the guest MAC, aa:bb:cc:dd:ee:ff
	OptMTU    = "mtu"   // the device MTU, when set
)
