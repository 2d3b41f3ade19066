package oci

import (
	"strings"
	"testing"
)

// TestCreateLongestID: an ID may be 255 bytes (ValidID, a name's limit).
// Create's temporary directory was the ID's name with "~new-PID" added,
// longer than a file name may be, so an ID of more than about 245 bytes,
// valid before, failed with ENAMETOOLONG.
func TestCreateLongestID(t *testing.T) {
	st := &Store{Root: t.TempDir()}
	for _, n := range []int{246, maxIDLen} {
		id := strings.Repeat("a", n)
		c, err := st.Create(id)
		if err != nil {
			t.Fatalf("Create of a %d-byte ID: %v", n, err)
		}
		c.Unlock()
		r, err := st.Read(id)
		if err != nil {
			t.Fatalf("Read of a %d-byte ID: %v", n, err)
		}
		if !r.marked() {
			t.Errorf("the %d-byte ID's state directory has no marker", n)
		}
	}
	ids, err := st.List()
	if err != nil || len(ids) != 2 {
		t.Errorf("List: %d IDs, %v; want the 2 created", len(ids), err)
	}
}
