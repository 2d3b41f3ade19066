package backend_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	"github.com/krun-core/krun-core/proto/pluginpb"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// PanicError caps its text at 256 bytes by slicing the string, which cuts
// a multi-byte character in two: the text is not UTF-8 any more. It goes
// into the plugin's Health answer (pluginsdk: "queue N failed: ..."), a
// proto3 string, whose marshalling then fails: the host's health check
// gets a gRPC Internal error instead of the ring's failure.
//
// From review, helper-106; fixed: the text is made valid UTF-8 after the
// cut (and the SDK's Health answer too, whatever the error).
func TestPanicErrorCapKeepsUTF8(t *testing.T) {
	v := "x" + strings.Repeat("é", 200) // valid UTF-8; byte 256 is inside a rune
	msg := (&backend.PanicError{Value: v}).Error()
	if !utf8.ValidString(msg) {
		_, err := proto.Marshal(&pluginpb.HealthResponse{State: pluginpb.HealthResponse_STATE_FAILED, Error: "queue 0 failed: " + msg})
		t.Fatalf("a capped panic text is not valid UTF-8 (the cap cuts a character); the plugin's Health answer with it: marshal error %v", err)
	}
}
