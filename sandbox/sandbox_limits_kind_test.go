package sandbox

import "testing"

func TestDefaultLimitsByKind(t *testing.T) {
	tests := []struct {
		kind string
		want uint64
	}{
		{"fs", FSOpenFiles},
		{"fs-virtio", FSOpenFiles},
		{"blk", 0},
		{"blk-qcow2", 0},
		{"net-passt", 0},
		{"fsck", 0},
	}
	for _, tt := range tests {
		if got := DefaultLimits(tt.kind).OpenFiles; got != tt.want {
			t.Errorf("DefaultLimits(%q).OpenFiles = %d, want %d", tt.kind, got, tt.want)
		}
	}
}
