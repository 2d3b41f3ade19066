package devspec

// Review of the option strings (helper rev-cli-89): values that are not
// what the user meant are taken silently.

import (
	"strings"
	"testing"
)

// strconv.Atoi takes a sign: queues=+4, workers=+4 and --vhost-user
// queues=+2 are accepted (and rendered back as queues=4), while cache=+4,
// mtu=+1500 and ports=+80 are refused.
func TestSignedCountsRefused(t *testing.T) {
	for _, tt := range []struct{ flag, spec string }{
		{"disk", "path=/x.img,format=raw,queues=+4"},
		{"fs", "path=/srv,tag=t,workers=+4"},
		{"vhost-user", "type=blk,socket=/tmp/x.sock,queues=+2"},
		{"vhost-user", "type=+2,socket=/tmp/x.sock"},
	} {
		if _, err := Parse(tt.flag, tt.spec); err == nil {
			t.Errorf("--%s %s: accepted, want a sign refused as cache=+4 is", tt.flag, tt.spec)
		}
	}
}

// reconnect= is parsed with ParseFloat, which takes Go float literals:
// hex floats, exponents and digit underscores (reconnect=0x1p0 is 1 s).
func TestReconnectDecimalOnly(t *testing.T) {
	for _, v := range []string{"0x1p0", "1e3", "1_0"} {
		if _, err := ParseVhostUser("type=blk,socket=/tmp/x.sock,reconnect=" + v); err == nil {
			t.Errorf("reconnect=%s: accepted, want decimal seconds only", v)
		}
	}
}

// ParseSize strips "iB" without a binary prefix: max-size=512iB is 512
// bytes, and --memory 1048576iB one MiB; "iB" alone is no unit.
func TestSizeBareIB(t *testing.T) {
	if n, err := ParseSize("512iB"); err == nil {
		t.Errorf("ParseSize(\"512iB\") = %d, nil: want an error (iB needs K, M, G, T or P)", n)
	}
}

// TestOnOffConsistent: readonly= took on/yes/true/off/no/false and said
// "want on or off" when it refused a value, while xattr= and suid= on the
// same --fs took only on|off. One rule now: on or off.
func TestOnOffConsistent(t *testing.T) {
	for _, k := range []string{"readonly", "xattr", "suid"} {
		for _, v := range []string{"yes", "true", "no", "false", "ON", "1", ""} {
			if _, err := ParseFS("path=/srv,tag=t," + k + "=" + v); err == nil || !strings.Contains(err.Error(), "want on or off") {
				t.Errorf("--fs %s=%s: %v, want on or off", k, v, err)
			}
		}
		for _, v := range []string{"on", "off"} {
			if _, err := ParseFS("path=/srv,tag=t," + k + "=" + v); err != nil {
				t.Errorf("--fs %s=%s: %v", k, v, err)
			}
		}
	}
	if _, err := ParseDisk("path=/x.img,format=raw,readonly=yes"); err == nil {
		t.Error("--disk readonly=yes accepted, want on or off")
	}
}

// An empty uidmap= or gidmap= is taken as "no map" (identity).
func TestEmptyIDMapRefused(t *testing.T) {
	for _, k := range []string{"uidmap", "gidmap"} {
		if _, err := ParseFS("path=/srv,tag=t," + k + "="); err == nil {
			t.Errorf("--fs %s= (empty): accepted as the identity, want GUEST:HOST:COUNT", k)
		}
	}
}
