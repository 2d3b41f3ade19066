package vmtest

import (
	"strconv"
	"sync"
	"time"
)

// hostTSCkHz is the host's TSC rate in kHz, measured once per test
// process; 0 where it cannot be measured (see measureTSC).
var hostTSCkHz = sync.OnceValue(measureTSC)

// tscCmdline returns the kernel parameter that gives a TCG guest its TSC
// rate, or "" when the host's is unknown.
//
// Under TCG a guest's TSC is the host's (QEMU reads the host's counter),
// but the guest kernel measures its rate at boot against the emulated PIT
// and HPET, in loops that assume a guest is not descheduled for long. On
// a loaded machine (CI's own nested QEMUs, a build) that measurement came
// out about 26 times too low once (100 MHz, the HPET's rate, for a 2.6
// GHz TSC; refined to the same): the outer guest's clock then ran 26
// times fast and every deadline in it, a plugin's handshake, a command's
// timeout, expired in a twenty-sixth of its time (CI run 22,
// 2026-12-07). tsc_early_khz replaces that measurement; the kernel's
// later refinement against the HPET still applies, but only within 1%.
func tscCmdline() string {
	if khz := hostTSCkHz(); khz > 0 {
		return "tsc_early_khz=" + strconv.FormatUint(khz, 10)
	}
	return ""
}

// measureTSC measures the host's TSC rate against the monotonic clock over
// three windows of 50 ms. Each TSC read is bracketed by two clock reads
// and kept only when they are close (the thread was not descheduled in
// between); the windows must agree within 0.1%, or it returns 0.
func measureTSC() uint64 {
	if !haveTSC {
		return 0
	}
	type sample struct {
		tsc uint64
		at  time.Time
	}
	read := func() (sample, bool) {
		for range 20 {
			a := time.Now()
			c := rdtsc()
			b := time.Now()
			if b.Sub(a) < 20*time.Microsecond {
				return sample{tsc: c, at: a.Add(b.Sub(a) / 2)}, true
			}
		}
		return sample{}, false
	}
	var rates []float64
	for range 3 {
		s0, ok0 := read()
		time.Sleep(50 * time.Millisecond)
		s1, ok1 := read()
		if !ok0 || !ok1 || s1.tsc <= s0.tsc {
			return 0
		}
		rates = append(rates, float64(s1.tsc-s0.tsc)/float64(s1.at.Sub(s0.at).Nanoseconds())*1e6) // kHz
	}
	lo, hi := rates[0], rates[0]
	for _, r := range rates {
		lo, hi = min(lo, r), max(hi, r)
	}
	// Below 100 MHz or past 10 GHz is not a TSC rate of a machine
	// that runs these tests.
	if hi-lo > lo/1000 || lo < 100_000 || hi > 10_000_000 {
		return 0
	}
	return uint64((lo + hi) / 2)
}
