package boottest

import (
	"testing"

	"github.com/krun-core/krun-core/core/boot"
	"github.com/krun-core/krun-core/guest/initramfs/kmod"
)

// The fake passes the checks it stands in for.
func TestFakeBzImage(t *testing.T) {
	img := FakeBzImage("6.1.0-test")
	if _, err := boot.ParseSetupHeader(img); err != nil {
		t.Errorf("setup header: %v", err)
	}
	if rel, err := kmod.ReleaseFromBzImage(img); err != nil || rel != "6.1.0-test" {
		t.Errorf("release %q, %v", rel, err)
	}
}
