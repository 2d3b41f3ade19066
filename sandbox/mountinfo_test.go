//go:build linux

package sandbox

import "testing"

func TestMountinfoRootIsRootfs(t *testing.T) {
	tests := []struct {
		name, text string
		want       bool
	}{
		{"initramfs", "1 1 0:2 / / rw - rootfs none rw\n22 1 0:20 / /proc rw,nosuid - proc proc rw\n", true},
		{"initramfs with optional fields", "1 1 0:2 / / rw shared:1 - rootfs rootfs rw,size=1g\n", true},
		{"disk root", "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n26 25 0:5 / /dev rw - devtmpfs udev rw\n", false},
		{"rootfs not at /", "1 0 0:2 / /mnt rw - rootfs rootfs rw\n", false},
		{"tmpfs root", "30 1 0:40 / / rw - tmpfs tmpfs rw\n", false},
		{"garbage", "not a mountinfo line\n - \n", false},
		{"empty", "", false},
	}
	for _, tc := range tests {
		if got := mountinfoRootIsRootfs([]byte(tc.text)); got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}
