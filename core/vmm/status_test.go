package vmm

import "testing"

func TestStatusPorts(t *testing.T) {
	var s statusPorts
	if _, ok := s.exitStatus(); ok {
		t.Fatal("exit status before any write")
	}
	for _, w := range []struct {
		port uint16
		data []byte
		ours bool
	}{
		{PortMilestone, []byte{MilestoneInit}, true},
		{PortMilestone, []byte{99}, true}, // unknown milestone: ignored
		{PortMilestone, nil, true},
		{PortMilestone, []byte{MilestoneExec}, true},
		{PortExitStatus, []byte{7}, true},
		{PortExitStatus, []byte{137}, true}, // the last value counts
		{0x3f8, []byte{'x'}, false},
	} {
		if got := s.write(w.port, w.data); got != w.ours {
			t.Errorf("write(%#x) = %v", w.port, got)
		}
	}
	if st, ok := s.exitStatus(); !ok || st != 137 {
		t.Errorf("exit status %d, %v", st, ok)
	}
	if s.initAt.Load() == 0 || s.execAt.Load() == 0 || s.exitAt.Load() < s.execAt.Load() {
		t.Errorf("milestones %d %d %d", s.initAt.Load(), s.execAt.Load(), s.exitAt.Load())
	}
	var z statusPorts
	z.write(PortExitStatus, []byte{0})
	if st, ok := z.exitStatus(); !ok || st != 0 {
		t.Errorf("status 0 read as %d, %v", st, ok)
	}
}
