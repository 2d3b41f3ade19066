package net

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestTxFrameWithinPasstLimit: passt resets the whole connection for a
// frame from the guest longer than 65535 bytes (ETH_MAX_MTU, "Bad frame
// size from guest"), and the link would stay down. A longer frame is
// dropped and counted; the next one goes through. (From review: a
// full-size VLAN-tagged frame at the default MTU was 65538 bytes.)
func TestTxFrameWithinPasstLimit(t *testing.T) {
	for _, tc := range []struct {
		mtu  uint16
		size int
		sent bool
	}{
		{0, DefaultMTU + ethHeaderLen + vlanLen, false}, // 65538
		{0, DefaultMTU + ethHeaderLen, true},            // 65534
		{65521, 65521 + ethHeaderLen, true},             // 65535, the largest
		{65521, 65521 + ethHeaderLen + vlanLen, false},  // 65539
		{1500, 1500 + ethHeaderLen + vlanLen, true},
	} {
		t.Run(fmt.Sprintf("mtu=%d/frame=%d", tc.mtu, tc.size), func(t *testing.T) {
			rg := newRig(t, tc.mtu, features)
			big := frame(tc.size, 1)
			rg.send(0, 12, big)
			good := frame(60, 3)
			rg.send(1, 12, good)
			got := rg.readPasst(t)
			if tc.sent {
				if !bytes.Equal(got, big) {
					t.Fatalf("passt got %d bytes, want the %d-byte frame", len(got), tc.size)
				}
				got = rg.readPasst(t)
			} else if n := rg.dev.stats.TxOversize.Load(); n != 1 {
				t.Errorf("TxOversize = %d, want 1", n)
			}
			if !bytes.Equal(got, good) {
				t.Fatalf("passt got %d bytes, want the 60-byte frame", len(got))
			}
		})
	}
}

// TestNewRefusesMTUOverPasstLimit: an MTU whose untagged frames passt
// would refuse is a configuration error.
func TestNewRefusesMTUOverPasstLimit(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "conn")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = New(Config{MAC: []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56}, MTU: 65522, Conn: f})
	if err == nil || !strings.Contains(err.Error(), "65535") {
		t.Fatalf("New with MTU 65522: %v, want an error naming passt's 65535-byte limit", err)
	}
}
