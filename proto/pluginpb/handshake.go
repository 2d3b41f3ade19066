// Package pluginpb holds the gRPC service between krun-core and its device
// plugins (generated from proto/device_plugin.proto) and the go-plugin
// handshake both sides must agree on.
package pluginpb

//go:generate ../generate.sh

import plugin "github.com/hashicorp/go-plugin"

// ProtocolVersion is the go-plugin handshake version. Bump it when a change
// to device_plugin.proto or to the fd conventions would be misread by a peer
// built against the previous version; go-plugin then refuses the pairing
// with a clear message instead of failing later.
const ProtocolVersion = 1

// Magic cookie: not a security measure, only keeps a user who runs a plugin
// by hand from getting a confusing hang (go-plugin prints a notice instead).
const (
	MagicCookieKey   = "KRUN_PLUGIN_MAGIC_COOKIE"
	MagicCookieValue = "6b72756e2d636f72652d646576696365" // hex("krun-core-device")
)

// PluginName is the name the device service is dispensed under.
const PluginName = "device"

// ExecutablePrefix prefixes every plugin executable: krun-plugin-<kind>.
const ExecutablePrefix = "krun-plugin-"

// Fd conventions inside the plugin process (see docs/PLUGINS.md).
const (
	// SocketFD is the vhost-user socket: the first exec.Cmd.ExtraFiles entry.
	SocketFD = 3
	// FirstResourceFD is the first file named in ConfigureRequest.files.
	FirstResourceFD = 4
)

// Handshake is the go-plugin handshake of krun-core device plugins.
func Handshake() plugin.HandshakeConfig {
	return plugin.HandshakeConfig{
		ProtocolVersion:  ProtocolVersion,
		MagicCookieKey:   MagicCookieKey,
		MagicCookieValue: MagicCookieValue,
	}
}
