package devspec

import (
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestHelperStartFailure: a helper (passt) that exits with a failure right
// after its start refused its arguments or its set-up, and is reported so
// that it is not restarted with the same arguments (found in review,
// helper-130); one that exits with status 0, or still runs, is not.
func TestHelperStartFailure(t *testing.T) {
	for _, tc := range []struct {
		name, script string
		exits        bool
		want         string // "" for no start failure
	}{
		{"refuses its arguments", "echo 'unrecognized option' >&2; exit 1", true, "sh failed at its start (exit status 1 after "},
		{"exits cleanly", "exit 0", true, ""},
		{"still running", "sleep 30", false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := &Opened{}
			if err := o.startHelper(exec.Command("sh", "-c", tc.script)); err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			if tc.exits {
				select {
				case <-o.HelperExited():
				case <-time.After(10 * time.Second):
					t.Fatal("the helper did not exit")
				}
			}
			err := o.HelperStartFailure()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("HelperStartFailure: %v, want none", err)
			case tc.want != "" && (err == nil || !strings.HasPrefix(err.Error(), tc.want)):
				t.Fatalf("HelperStartFailure: %v, want %q...", err, tc.want)
			}
		})
	}
}
