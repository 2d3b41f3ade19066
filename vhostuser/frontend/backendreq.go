package frontend

import (
	"errors"
	"fmt"
	"os"

	"github.com/krun-core/krun-core/vhostuser"
)

// SetBackendReqFD gives the back-end f, a connected unix stream socket, as
// its channel for requests to the front-end (needs ProtocolBackendReq).
func (c *Client) SetBackendReqFD(f *os.File) error {
	_, err := c.call(vhostuser.SetBackendReqFD, nil, []*os.File{f})
	return err
}

// BackendRequests opens the back-end request channel: it makes a socket
// pair, gives the back-end one end (SET_BACKEND_REQ_FD), and reads the
// back-end's requests from the other on a goroutine, calling onConfigChange
// for each VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. Other requests are
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
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := conn.Recv()
			if err != nil {
				return // closed by either side, or garbage: stop listening
			}
			m.CloseFiles()
			switch {
			case vhostuser.BackendRequest(m.Request) == vhostuser.BackendConfigChangeMsg && len(m.Payload) == 0:
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
