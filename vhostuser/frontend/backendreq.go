package frontend

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
)

// SetBackendReqFD gives the back-end f, a connected unix stream socket, as
// its channel for requests to the front-end (needs ProtocolBackendReq).
func (c *Client) SetBackendReqFD(f *os.File) error {
	_, err := c.call(vhostuser.SetBackendReqFD, nil, []*os.File{f})
	return err
}

// ConfigChangeInterval is the least time between two config-change
// messages of a back-end that BackendRequests hands on: each costs a
// GET_CONFIG round trip and a config-change interrupt in the guest, and a
// back-end (a plugin parsing hostile bytes, perhaps compromised) could
// send them without pause. A real back-end sends one when something
// changes (a link going down), far less often; a message that comes
// sooner waits its turn, and the back-end waits with it (its channel
// fills, or its need_reply waits for the answer).
const ConfigChangeInterval = 10 * time.Millisecond

// BackendRequests opens the back-end request channel: it makes a socket
// pair, gives the back-end one end (SET_BACKEND_REQ_FD), and reads the
// back-end's requests from the other on a goroutine, calling onConfigChange
// for each VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, at most one every
// ConfigChangeInterval. Other requests are
// answered with a failure when the back-end asks for a reply, and
// otherwise ignored. The returned function closes the channel and waits for
// the goroutine; the goroutine also ends when the back-end closes its end.
func (c *Client) BackendRequests(onConfigChange func()) (stop func(), err error) {
	if c.ProtocolFeatures()&vhostuser.ProtocolBackendReq == 0 {
		return nil, errors.New("back-end request channel: VHOST_USER_PROTOCOL_F_BACKEND_REQ not negotiated")
	}
	ours, theirs, err := vhostuser.SocketPair()
	if err != nil {
		return nil, fmt.Errorf("back-end request channel: %w", err)
	}
	err = c.SetBackendReqFD(theirs)
	theirs.Close()
	if err != nil {
		ours.Close()
		return nil, err
	}
	conn, err := vhostuser.NewConn(ours)
	ours.Close()
	if err != nil {
		return nil, fmt.Errorf("back-end request channel: %w", err)
	}
	every := c.configEvery
	done := make(chan struct{})
	go func() {
		defer close(done)
		var last time.Time
		for {
			m, err := conn.Recv()
			if err != nil {
				return // closed by either side, or garbage: stop listening
			}
			m.CloseFiles()
			switch {
			case vhostuser.BackendRequest(m.Request) == vhostuser.BackendConfigChangeMsg && len(m.Payload) == 0:
				if wait := every - time.Since(last); !last.IsZero() && wait > 0 {
					time.Sleep(wait)
				}
				last = time.Now()
				onConfigChange()
				if m.NeedReply() {
					conn.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, vhostuser.EncodeU64(0), nil)
				}
			case m.NeedReply():
				conn.Send(m.Request, vhostuser.Version|vhostuser.FlagReply, vhostuser.EncodeU64(1), nil)
			}
		}
	}()
	return func() {
		conn.Close()
		<-done
	}, nil
}
