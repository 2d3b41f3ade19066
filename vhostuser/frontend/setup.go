package frontend

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/krun-core/krun-core/vhostuser"
)

// SupportedProtocolFeatures are the protocol features this front-end can
// use; Setup never acks others.
const SupportedProtocolFeatures = vhostuser.ProtocolMQ | vhostuser.ProtocolReplyAck |
	vhostuser.ProtocolConfig | vhostuser.ProtocolConfigureMemSlots | vhostuser.ProtocolBackendReq |
	vhostuser.ProtocolInflightSHMFD | vhostuser.ProtocolResetDevice

// QueueSetup describes one ring for Setup. Addresses are front-end virtual
// addresses (the user addresses of the memory table).
type QueueSetup struct {
	Index uint32
	Size  uint16
	Desc  uint64
	Avail uint64
	Used  uint64
	Base  uint16   // first available index (0 for a fresh ring)
	Kick  *os.File // eventfd the driver writes; nil: back-end polls
	Call  *os.File // eventfd the back-end writes; nil: driver polls
	Err   *os.File // optional error eventfd
	// Disabled leaves the ring disabled (when protocol features are
	// negotiated; otherwise rings are always enabled).
	Disabled bool
}

// SetupConfig is what Setup negotiates and installs.
type SetupConfig struct {
	// Features are the virtio features the driver wants; Setup acks the
	// intersection with the back-end's offer (plus
	// VHOST_USER_F_PROTOCOL_FEATURES when offered).
	Features uint64
	// RequiredFeatures must all be offered, or Setup fails.
	RequiredFeatures uint64
	// ProtocolFeatures the driver wants; masked with the offer and with
	// SupportedProtocolFeatures.
	ProtocolFeatures uint64
	// Regions is the guest memory. With more than MaxMemTableRegions
	// regions CONFIGURE_MEM_SLOTS must be negotiated (ADD_MEM_REG is used).
	Regions []MemRegion
	// UseAddMemReg forces ADD_MEM_REG even for few regions (needs
	// CONFIGURE_MEM_SLOTS).
	UseAddMemReg bool
	Queues       []QueueSetup
}

// Negotiated is the outcome of Setup.
type Negotiated struct {
	OfferedFeatures  uint64
	Features         uint64 // acked with SET_FEATURES
	OfferedProtocol  uint64
	ProtocolFeatures uint64 // acked with SET_PROTOCOL_FEATURES
	MaxQueues        uint64 // GET_QUEUE_NUM, 0 without MQ
	MaxMemSlots      uint64 // GET_MAX_MEM_SLOTS, 0 without CONFIGURE_MEM_SLOTS
}

// Setup runs the standard start-up sequence: Negotiate, then Install.
func (c *Client) Setup(cfg SetupConfig) (Negotiated, error) {
	n, err := c.Negotiate(cfg)
	if err != nil {
		return n, err
	}
	return n, c.Install(cfg, n)
}

// Negotiate runs the first half of the start-up sequence: SET_OWNER,
// GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (checked against
// cfg.Queues), SET_FEATURES and GET_MAX_MEM_SLOTS. cfg.Regions and the
// queue addresses are not used yet, so a driver can lay out its rings
// according to the negotiated features before calling Install.
func (c *Client) Negotiate(cfg SetupConfig) (Negotiated, error) {
	var n Negotiated
	if err := c.SetOwner(); err != nil {
		return n, err
	}
	offered, err := c.GetFeatures()
	if err != nil {
		return n, err
	}
	n.OfferedFeatures = offered
	if missing := cfg.RequiredFeatures &^ offered; missing != 0 {
		return n, fmt.Errorf("back-end lacks required features %#x (offers %#x)", missing, offered)
	}
	// VHOST_F_LOG_ALL turns on dirty-page logging, which this front-end
	// never sets up (no log base): libvhost-user back-ends offer it to
	// everyone, and "everything offered" must not switch it on.
	n.Features = (cfg.Features | cfg.RequiredFeatures) & offered &^ (vhostuser.FeatureProtocolFeatures | vhostuser.FeatureLogAll)
	if offered&vhostuser.FeatureProtocolFeatures != 0 {
		n.Features |= vhostuser.FeatureProtocolFeatures
		p, err := c.GetProtocolFeatures()
		if err != nil {
			return n, err
		}
		n.OfferedProtocol = p
		n.ProtocolFeatures = p & cfg.ProtocolFeatures & SupportedProtocolFeatures
		if err := c.SetProtocolFeatures(n.ProtocolFeatures); err != nil {
			return n, err
		}
		if n.ProtocolFeatures&vhostuser.ProtocolMQ != 0 {
			if n.MaxQueues, err = c.GetQueueNum(); err != nil {
				return n, err
			}
			for _, q := range cfg.Queues {
				if uint64(q.Index) >= n.MaxQueues {
					return n, fmt.Errorf("queue %d: back-end supports %d queues", q.Index, n.MaxQueues)
				}
			}
		}
	}
	if err := c.SetFeatures(n.Features); err != nil {
		return n, err
	}
	if n.ProtocolFeatures&vhostuser.ProtocolConfigureMemSlots != 0 {
		if n.MaxMemSlots, err = c.GetMaxMemSlots(); err != nil {
			return n, err
		}
	}
	return n, nil
}

// Install sends the memory table (SET_MEM_TABLE, or ADD_MEM_REG per region)
// and sets up every queue of cfg (SetupQueue).
func (c *Client) Install(cfg SetupConfig, n Negotiated) error {
	if err := c.installMemory(cfg, n); err != nil {
		return err
	}
	protocolNegotiated := n.Features&vhostuser.FeatureProtocolFeatures != 0
	for _, q := range cfg.Queues {
		if err := c.SetupQueue(q, protocolNegotiated); err != nil {
			return err
		}
	}
	return nil
}

func (c *Client) installMemory(cfg SetupConfig, n Negotiated) error {
	slots := n.ProtocolFeatures&vhostuser.ProtocolConfigureMemSlots != 0
	if !cfg.UseAddMemReg && len(cfg.Regions) <= vhostuser.MaxMemTableRegions {
		return c.SetMemTable(cfg.Regions)
	}
	if !slots {
		return fmt.Errorf("%d memory regions need CONFIGURE_MEM_SLOTS, not negotiated", len(cfg.Regions))
	}
	if uint64(len(cfg.Regions)) > n.MaxMemSlots {
		return fmt.Errorf("%d memory regions, back-end holds %d", len(cfg.Regions), n.MaxMemSlots)
	}
	for _, r := range cfg.Regions {
		if err := c.AddMemReg(r); err != nil {
			return err
		}
	}
	return nil
}

// SetupQueue configures and starts one ring: SET_VRING_NUM, SET_VRING_BASE,
// SET_VRING_ADDR, SET_VRING_CALL, SET_VRING_ERR (if q.Err), SET_VRING_KICK
// (which starts it) and, when protocolNegotiated (only then is it legal),
// SET_VRING_ENABLE. The requests share one deadline, the client's timeout
// from the first: a back-end that answers each one just in time cannot
// hold the caller (a vCPU) for several timeouts.
func (c *Client) SetupQueue(q QueueSetup, protocolNegotiated bool) error {
	return c.SetupQueueWithin(q, protocolNegotiated, 0)
}

// SetupQueueWithin is SetupQueue within limit, when it is shorter than the
// client's timeout (0: the timeout). Past the deadline the set-up fails
// with ErrTimeout and the connection is broken, as for a request that
// timed out: the ring is half set up.
func (c *Client) SetupQueueWithin(q QueueSetup, protocolNegotiated bool, limit time.Duration) error {
	if q.Index > uint32(vhostuser.VringIdxMask) {
		return fmt.Errorf("set up ring %d: the index does not fit in 8 bits", q.Index)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	budget := within(c.timeout, limit)
	var deadline time.Time
	if budget > 0 {
		deadline = time.Now().Add(budget)
	}
	step := func(req vhostuser.Request, payload []byte, f *os.File) error {
		var files []*os.File
		if f != nil {
			files = []*os.File{f}
		}
		timeout := time.Duration(0)
		if !deadline.IsZero() {
			if timeout = time.Until(deadline); timeout <= 0 {
				err := fmt.Errorf("%v: %w (setting up ring %d took its %v)", req, ErrTimeout, q.Index, budget)
				if c.broken == nil {
					c.broken = err
					c.conn.Close()
				}
				return err
			}
		}
		_, err := c.callWithin(req, payload, files, timeout)
		return err
	}
	if err := step(vhostuser.SetVringNum, vhostuser.VringState{Index: q.Index, Num: uint32(q.Size)}.Encode(), nil); err != nil {
		return err
	}
	if err := step(vhostuser.SetVringBase, vhostuser.VringState{Index: q.Index, Num: uint32(q.Base)}.Encode(), nil); err != nil {
		return err
	}
	addr := vhostuser.VringAddr{Index: q.Index, Desc: q.Desc, Used: q.Used, Avail: q.Avail}
	if err := step(vhostuser.SetVringAddr, addr.Encode(), nil); err != nil {
		return err
	}
	if err := step(vhostuser.SetVringCall, vhostuser.EncodeVringFD(q.Index, q.Call == nil), q.Call); err != nil {
		return err
	}
	if q.Err != nil {
		if err := step(vhostuser.SetVringErr, vhostuser.EncodeVringFD(q.Index, false), q.Err); err != nil {
			return err
		}
	}
	if err := step(vhostuser.SetVringKick, vhostuser.EncodeVringFD(q.Index, q.Kick == nil), q.Kick); err != nil {
		return err
	}
	if protocolNegotiated {
		enable := uint32(1)
		if q.Disabled {
			enable = 0
		}
		if err := step(vhostuser.SetVringEnable, vhostuser.VringState{Index: q.Index, Num: enable}.Encode(), nil); err != nil {
			return err
		}
	}
	return nil
}

// Reattach brings a new back-end to where the previous one was, after the
// previous one died: it negotiates as Negotiate does (cfg), checks that
// the new back-end offers every virtio feature and protocol feature the
// previous one had acked (prev), sends the memory table and the inflight
// region the previous back-end used (nil: none). The caller then sets up
// each ring that was running (SetupQueue) with Base at the used index in
// guest memory: the back-end resubmits the requests the region says were
// in flight and resumes after them. Features the driver acked later (the
// core's SET_FEATURES at FEATURES_OK) are the caller's to send again,
// before the rings.
func (c *Client) Reattach(cfg SetupConfig, prev Negotiated, inflight *Inflight) (Negotiated, error) {
	n, err := c.Negotiate(cfg)
	if err != nil {
		return n, err
	}
	if missing := prev.Features &^ n.OfferedFeatures; missing != 0 {
		return n, fmt.Errorf("new back-end lacks features %#x the previous one had", missing)
	}
	if missing := prev.ProtocolFeatures &^ n.ProtocolFeatures; missing != 0 {
		return n, fmt.Errorf("new back-end lacks protocol features %#x the previous one had", missing)
	}
	if err := c.installMemory(cfg, n); err != nil {
		return n, err
	}
	if inflight != nil {
		if n.ProtocolFeatures&vhostuser.ProtocolInflightSHMFD == 0 {
			return n, errors.New("new back-end does not track requests in flight (INFLIGHT_SHMFD)")
		}
		if err := c.SetInflightFD(inflight); err != nil {
			return n, err
		}
	}
	return n, nil
}
