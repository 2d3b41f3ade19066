package cli

import "testing"

func TestBuildString(t *testing.T) {
	for _, tc := range []struct {
		b    Build
		want string
	}{
		{Build{Version: "(devel)"}, "(devel)"},
		{Build{Version: "v1.2.3", Revision: "0123456789abcdef0123"}, "v1.2.3 commit 0123456789ab"},
		{Build{Version: "(devel)", Revision: "abc", Modified: true}, "(devel) commit abc (modified)"},
		{Build{Version: "v1", Modified: true}, "v1"}, // no commit: nothing to call modified
		// Go's pseudo-version already names the commit and the changes.
		{Build{Version: "v0.0.0-20261206054017-fd3b6b0eeb64+dirty", Revision: "fd3b6b0eeb64aa", Modified: true}, "v0.0.0-20261206054017-fd3b6b0eeb64+dirty"},
	} {
		if got := tc.b.String(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.b, got, tc.want)
		}
	}
	if b := ReadBuild(); b.Version == "" {
		t.Errorf("ReadBuild: empty version in %+v", b)
	}
}
