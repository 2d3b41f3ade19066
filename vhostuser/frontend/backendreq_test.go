package frontend

import (
	"sync"
	"testing"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
)

// TestConfigChangesSpaced: a back-end that sends config-change messages
// without pause (a compromised plugin) gets them handed on at most one
// every configEvery: each costs the core a GET_CONFIG round trip and the
// guest a config interrupt. Every message is still handed on, and stop
// returns with some of them not yet read. (From review, helper-110:
// nothing limited them.)
func TestConfigChangesSpaced(t *testing.T) {
	for _, tc := range []struct {
		name      string
		needReply bool
	}{
		{"no reply", false},
		{"need_reply", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, b := clientPair(t)
			c.protocol = vhostuser.ProtocolBackendReq
			const every = 20 * time.Millisecond
			c.configEvery = every

			var mu sync.Mutex
			var seen []time.Time
			got := make(chan struct{}, 100)
			channel := make(chan *vhostuser.Conn, 1)
			go func() {
				m, err := b.Recv()
				if err != nil || m.Request != vhostuser.SetBackendReqFD || len(m.Files) != 1 {
					close(channel)
					return
				}
				conn, err := vhostuser.NewConn(m.Files[0])
				m.CloseFiles()
				if err != nil {
					close(channel)
					return
				}
				channel <- conn
			}()
			stop, err := c.BackendRequests(func() {
				mu.Lock()
				seen = append(seen, time.Now())
				mu.Unlock()
				got <- struct{}{}
			})
			if err != nil {
				t.Fatal(err)
			}
			back, ok := <-channel
			if !ok {
				t.Fatal("the back-end got no request channel")
			}
			defer back.Close()
			flags := vhostuser.Version
			if tc.needReply {
				flags |= vhostuser.FlagNeedReply
			}
			const n = 10
			go func() {
				for range n {
					if back.Send(vhostuser.Request(vhostuser.BackendConfigChangeMsg), flags, nil, nil) != nil {
						return
					}
					if tc.needReply {
						if _, err := back.Recv(); err != nil {
							return
						}
					}
				}
			}()
			limit := time.After(30 * time.Second)
			for i := range n {
				select {
				case <-got:
				case <-limit:
					t.Fatalf("%d of %d config changes handed on in 30s", i, n)
				}
			}
			mu.Lock()
			span := seen[n-1].Sub(seen[0])
			mu.Unlock()
			// The first call may start late by the time the callback
			// takes to note it: one interval of slack.
			if least := (n - 2) * every; span < least {
				t.Errorf("%d config changes handed on within %v, want at least %v (one every %v)", n, span, least, every)
			}

			// A backlog does not hold stop.
			for range 5 {
				back.Send(vhostuser.Request(vhostuser.BackendConfigChangeMsg), vhostuser.Version, nil, nil)
			}
			stop()
		})
	}
}
