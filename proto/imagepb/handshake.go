// Package imagepb holds the gRPC service between `krun-core img` and the
// sandboxed image plugin krun-plugin-img (generated from image_tool.proto)
// and the go-plugin handshake both sides must agree on.
//
// The image plugin is not a device plugin: it has its own handshake cookie
// and plugin name, so neither kind of plugin can be mistaken for the other.
package imagepb

//go:generate ./generate.sh

import plugin "github.com/hashicorp/go-plugin"

// ProtocolVersion is the go-plugin handshake version of the image plugin.
// Bump it when a change to image_tool.proto or to the fd conventions would
// be misread by a peer built against the previous version.
const ProtocolVersion = 1

// Magic cookie: not a security measure, only keeps a user who runs the
// plugin by hand from getting a confusing hang.
const (
	MagicCookieKey   = "KRUN_IMG_PLUGIN_MAGIC_COOKIE"
	MagicCookieValue = "6b72756e2d636f72652d696d616765" // hex("krun-core-image")
)

// PluginName is the name the image service is dispensed under.
const PluginName = "image"

// Kind is the plugin kind: the executable is krun-plugin-img.
const Kind = "img"

// FirstFD is the fd of the first file the host hands over (the first
// exec.Cmd.ExtraFiles entry); the others follow in order.
const FirstFD = 3

// MaxFiles bounds the files one plugin process is handed (an image, a
// backing chain of 16, a data file, an output).
const MaxFiles = 32

// Handshake is the go-plugin handshake of the image plugin.
func Handshake() plugin.HandshakeConfig {
	return plugin.HandshakeConfig{
		ProtocolVersion:  ProtocolVersion,
		MagicCookieKey:   MagicCookieKey,
		MagicCookieValue: MagicCookieValue,
	}
}
