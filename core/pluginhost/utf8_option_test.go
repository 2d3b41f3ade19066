package pluginhost

// From review (helper sdkreview): ConfigureRequest.options is a proto3
// map<string, string>, which gRPC refuses to marshal unless every key and
// value is valid UTF-8. A Linux path is any bytes: `krun-core serve --disk
// path=/srv/caf\xe9.img` (devspec.checkPath refuses only NUL) puts it in
// the "path" option, and a third-party plugin's options are the user's
// bytes as given. The host then fails the launch with gRPC's internal
// "grpc: error while marshaling: string field contains invalid UTF-8",
// which names neither the option nor the fix.

import (
	"context"
	"strings"
	"testing"
)

func TestNonUTF8OptionNamed(t *testing.T) {
	p, err := Launch(testConfig(t, "ok"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	_, _, err = p.Configure(context.Background(), map[string]string{"path": "/srv/caf\xe9.img"})
	if err == nil {
		return // carried: fine too
	}
	if strings.Contains(err.Error(), "marshaling") || !strings.Contains(err.Error(), "path") {
		t.Fatalf("a non-UTF-8 option value fails Configure with %q: want an error that names the option", err)
	}
}
