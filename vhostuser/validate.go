package vhostuser

import "fmt"

// VringFD is the decoded payload of SET_VRING_KICK/CALL/ERR.
type VringFD struct {
	Index uint32
	NoFD  bool // polling: no descriptor was sent
}

// Supported reports whether this package knows the payload layout of the
// request and therefore whether CheckRequest can validate it. Requests
// outside this set are refused with ErrUnknownRequest.
func Supported(r Request) bool {
	switch r {
	case GetFeatures, SetFeatures, SetOwner, ResetOwner, SetMemTable,
		SetVringNum, SetVringAddr, SetVringBase, GetVringBase,
		SetVringKick, SetVringCall, SetVringErr,
		GetProtocolFeatures, SetProtocolFeatures, GetQueueNum, SetVringEnable,
		GetConfig, SetConfig, GetMaxMemSlots, AddMemReg, RemMemReg, SetBackendReqFD,
		GetInflightFD, SetInflightFD, ResetDevice:
		return true
	}
	return false
}

// HasReply reports whether the request always gets a reply body (apart from
// any REPLY_ACK).
func HasReply(r Request) bool {
	switch r {
	case GetFeatures, GetProtocolFeatures, GetVringBase, GetQueueNum, GetConfig, GetMaxMemSlots,
		GetInflightFD:
		return true
	}
	return false
}

// ParseRequest validates a request received by a back-end: the request code
// is supported, it is not flagged as a reply, the payload has exactly the
// size and structure the request defines, and exactly the right number of
// file descriptors came with it. It returns the decoded payload:
//
//	nil                  GET_FEATURES, SET_OWNER, RESET_OWNER, GET_PROTOCOL_FEATURES,
//	                     GET_QUEUE_NUM, GET_MAX_MEM_SLOTS
//	uint64               SET_FEATURES, SET_PROTOCOL_FEATURES
//	VringState           SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE
//	VringAddr            SET_VRING_ADDR
//	VringFD              SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR
//	[]MemRegion          SET_MEM_TABLE (one file per region, in order)
//	MemRegion            ADD_MEM_REG (one file), REM_MEM_REG (zero or one file)
//	ConfigSpace          GET_CONFIG, SET_CONFIG (Data aliases the payload)
//	Inflight             GET_INFLIGHT_FD (no file), SET_INFLIGHT_FD (one file)
//
// Values inside the payload (ring indexes, sizes, addresses) are checked
// only as far as the wire format defines them; the back-end checks them
// against its state.
func ParseRequest(m *Message) (any, error) {
	v, err := parseRequest(m)
	if err != nil {
		return nil, fmt.Errorf("%v: %w", m.Request, err)
	}
	return v, nil
}

func parseRequest(m *Message) (any, error) {
	if !Supported(m.Request) {
		return nil, ErrUnknownRequest
	}
	if m.IsReply() {
		return nil, fmt.Errorf("%w: reply flag set on a request", ErrBadHeader)
	}
	if len(m.Payload) > MaxPayloadSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrPayloadTooBig, len(m.Payload))
	}
	nfd := len(m.Files)
	if nfd > MaxFDs {
		return nil, fmt.Errorf("%w: %d", ErrTooManyFDs, nfd)
	}
	wantFDs := func(n int) error {
		switch {
		case nfd < n:
			return fmt.Errorf("%w: got %d, want %d", ErrMissingFD, nfd, n)
		case nfd > n:
			return fmt.Errorf("%w: got %d, want %d", ErrUnexpectedFD, nfd, n)
		}
		return nil
	}
	noPayload := func() error {
		if len(m.Payload) != 0 {
			return fmt.Errorf("%w: %d bytes, want 0", ErrPayloadSize, len(m.Payload))
		}
		return wantFDs(0)
	}

	switch m.Request {
	case GetFeatures, SetOwner, ResetOwner, GetProtocolFeatures, GetQueueNum, GetMaxMemSlots, ResetDevice:
		return nil, noPayload()
	case SetFeatures, SetProtocolFeatures:
		v, err := DecodeU64(m.Payload)
		if err != nil {
			return nil, err
		}
		return v, wantFDs(0)
	case SetVringNum, SetVringBase, GetVringBase, SetVringEnable:
		s, err := DecodeVringState(m.Payload)
		if err != nil {
			return nil, err
		}
		return s, wantFDs(0)
	case SetVringAddr:
		a, err := DecodeVringAddr(m.Payload)
		if err != nil {
			return nil, err
		}
		return a, wantFDs(0)
	case SetVringKick, SetVringCall, SetVringErr:
		idx, noFD, err := DecodeVringFD(m.Payload)
		if err != nil {
			return nil, err
		}
		n := 1
		if noFD {
			n = 0
		}
		return VringFD{Index: idx, NoFD: noFD}, wantFDs(n)
	case SetMemTable:
		rs, err := DecodeMemTable(m.Payload)
		if err != nil {
			return nil, err
		}
		return rs, wantFDs(len(rs))
	case AddMemReg:
		r, err := DecodeSingleMemRegion(m.Payload)
		if err != nil {
			return nil, err
		}
		return r, wantFDs(1)
	case RemMemReg:
		r, err := DecodeSingleMemRegion(m.Payload)
		if err != nil {
			return nil, err
		}
		// The spec allows (and says to ignore) one stray descriptor.
		if nfd > 1 {
			return nil, fmt.Errorf("%w: got %d, want at most 1", ErrUnexpectedFD, nfd)
		}
		return r, nil
	case GetConfig, SetConfig:
		c, err := DecodeConfigSpace(m.Payload)
		if err != nil {
			return nil, err
		}
		return c, wantFDs(0)
	case SetBackendReqFD:
		if len(m.Payload) != 0 {
			return nil, fmt.Errorf("%w: %d bytes, want 0", ErrPayloadSize, len(m.Payload))
		}
		return nil, wantFDs(1)
	case GetInflightFD, SetInflightFD:
		in, err := DecodeInflight(m.Payload)
		if err != nil {
			return nil, err
		}
		n := 0
		if m.Request == SetInflightFD {
			n = 1
		}
		return in, wantFDs(n)
	}
	return nil, ErrUnknownRequest
}

// ParseReply validates a back-end's reply to req as received by a
// front-end: reply flag and request code match, no file descriptors (one
// for GET_INFLIGHT_FD), and the payload has the reply's exact size. ack
// selects a REPLY_ACK (u64 status) for requests without a reply body. It
// returns the decoded payload: uint64 (features, counts, ack status),
// VringState (GET_VRING_BASE), ConfigSpace (GET_CONFIG; an empty payload
// means the back-end refused, reported as an error) or Inflight
// (GET_INFLIGHT_FD; a region of size 0 means the back-end has none, an
// error, and the caller owns m.Files[0] otherwise).
func ParseReply(req Request, ack bool, m *Message) (any, error) {
	v, err := parseReply(req, ack, m)
	if err != nil {
		return nil, fmt.Errorf("reply to %v: %w", req, err)
	}
	return v, nil
}

func parseReply(req Request, ack bool, m *Message) (any, error) {
	if !m.IsReply() {
		return nil, fmt.Errorf("%w: reply flag missing", ErrBadHeader)
	}
	if m.Request != req {
		return nil, fmt.Errorf("%w: reply is for %v", ErrBadHeader, m.Request)
	}
	if req == GetInflightFD {
		in, err := DecodeInflight(m.Payload)
		if err != nil {
			return nil, err
		}
		switch {
		case in.MmapSize == 0:
			return nil, fmt.Errorf("%w: back-end has no inflight region", ErrBadPayload)
		case len(m.Files) == 0:
			return nil, fmt.Errorf("%w: none with the inflight region", ErrMissingFD)
		case len(m.Files) > 1:
			return nil, fmt.Errorf("%w: %d with the inflight region, want 1", ErrUnexpectedFD, len(m.Files))
		}
		return in, nil
	}
	if len(m.Files) != 0 {
		return nil, fmt.Errorf("%w: %d in reply", ErrUnexpectedFD, len(m.Files))
	}
	if ack && !HasReply(req) {
		return DecodeU64(m.Payload)
	}
	switch req {
	case GetFeatures, GetProtocolFeatures, GetQueueNum, GetMaxMemSlots:
		return DecodeU64(m.Payload)
	case GetVringBase:
		return DecodeVringState(m.Payload)
	case GetConfig:
		if len(m.Payload) == 0 {
			return nil, fmt.Errorf("%w: back-end refused the config access", ErrBadPayload)
		}
		return DecodeConfigSpace(m.Payload)
	}
	return nil, fmt.Errorf("%w: no reply expected", ErrUnknownRequest)
}
