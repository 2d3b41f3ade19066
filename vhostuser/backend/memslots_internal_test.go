package backend

import (
	"testing"

	"github.com/krun-core/krun-core/vhostuser"
)

func TestMemSlotsFor(t *testing.T) {
	tests := []struct {
		name   string
		nofile uint64
		queues int
		want   int
	}{
		{"sandbox default, one queue", 256, 1, 256 - fdReserve - fdReservePerQ},
		{"sandbox default, 256 queues", 256, 256, vhostuser.MaxMemTableRegions},
		{"tiny limit", 16, 1, vhostuser.MaxMemTableRegions},
		{"exactly the reserve plus the minimum", fdReserve + fdReservePerQ + vhostuser.MaxMemTableRegions, 1, vhostuser.MaxMemTableRegions},
		{"large limit", 1 << 20, 4, vhostuser.MaxMemSlots},
		{"unlimited", ^uint64(0), 2, vhostuser.MaxMemSlots},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := memSlotsFor(tt.nofile, tt.queues); got != tt.want {
				t.Errorf("memSlotsFor(%d, %d) = %d, want %d", tt.nofile, tt.queues, got, tt.want)
			}
		})
	}
}
