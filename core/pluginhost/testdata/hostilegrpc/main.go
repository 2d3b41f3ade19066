// Command hostilegrpc is a hostile plugin for the pluginhost tests (built
// as krun-plugin-hostilegrpc): a compromised plugin writes whatever it
// likes on its stdout (go-plugin's handshake channel) and its gRPC socket.
// KRUN_TEST_MODE selects what:
//
//	nostreams  a valid handshake line for a unix socket in its socket
//	           directory; the host's HTTP/2 connection is answered with
//	           SETTINGS_MAX_CONCURRENT_STREAMS 0 (SETTINGS and PING are
//	           answered), so no stream can ever be opened on it
//	nostreams-keep  nostreams, and the accepted connection's descriptor is
//	           also sent (SCM_RIGHTS) over fd 3, the plugin's vhost-user
//	           socket, whose other end the core does not read before the
//	           launch is done: the connection outlives the process
//	           (review, helper-98)
//	cert       a valid handshake line with a sixth field: a server
//	           certificate (base64 DER of a self-signed one), which
//	           go-plugin loads only for AutoMTLS
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	plugin "github.com/hashicorp/go-plugin"
	"golang.org/x/net/http2"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/proto/pluginpb"
)

// defaultMode is the mode when KRUN_TEST_MODE is unset (krun-core passes
// no environment of its own to a plugin): go build -ldflags
// "-X main.defaultMode=cert" makes a stand-alone reproducer.
var defaultMode string

func mode() string {
	if m := os.Getenv("KRUN_TEST_MODE"); m != "" {
		return m
	}
	return defaultMode
}

func main() {
	dir := os.Getenv(plugin.EnvUnixSocketDir)
	path := filepath.Join(dir, "plugin-hostile")
	l, err := net.Listen("unix", path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "hostilegrpc:", err)
		os.Exit(1)
	}
	line := fmt.Sprintf("1|%d|unix|%s|grpc", pluginpb.ProtocolVersion, path)
	if mode() == "cert" {
		line += "|" + selfSigned()
	}
	fmt.Println(line)
	for {
		c, err := l.Accept()
		if err != nil {
			os.Exit(1)
		}
		go serve(c)
	}
}

func selfSigned() string {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	return base64.RawStdEncoding.EncodeToString(der)
}

func serve(c net.Conn) {
	defer c.Close()
	if mode() == "nostreams-keep" {
		if f, err := c.(*net.UnixConn).File(); err == nil {
			if err := unix.Sendmsg(3, []byte{0}, unix.UnixRights(int(f.Fd())), nil, 0); err != nil {
				fmt.Fprintln(os.Stderr, "hostilegrpc: sendmsg:", err)
			}
			f.Close()
		}
	}
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c, preface); err != nil {
		return
	}
	fr := http2.NewFramer(c, c)
	if err := fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0}); err != nil {
		return
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				fr.WritePing(true, f.Data)
			}
		}
	}
}
