package vmtest

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestMeasureTSC: the host's TSC rate is measured, and where the host's
// kernel knows it (tsc_known_freq, and no APERF/MPERF, so that "cpu MHz"
// is that rate and not the core's current clock) the two agree.
func TestMeasureTSC(t *testing.T) {
	if !haveTSC {
		t.Skip("no TSC on this architecture")
	}
	var khz uint64
	for range 3 { // windows that disagree (a loaded machine) give 0
		if khz = measureTSC(); khz != 0 {
			break
		}
	}
	if khz == 0 {
		t.Fatal("measureTSC gave no rate in three tries")
	}
	t.Logf("host TSC %d kHz", khz)
	mhz, ok := cpuinfoTSCMHz(t)
	if !ok {
		return
	}
	if d := float64(khz)/1000 - mhz; d > mhz/200 || d < -mhz/200 {
		t.Errorf("measured %d kHz, the kernel's %.3f MHz: more than 0.5%% apart", khz, mhz)
	}
}

// cpuinfoTSCMHz returns /proc/cpuinfo's "cpu MHz" where it is the TSC's rate.
func cpuinfoTSCMHz(t *testing.T) (float64, bool) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		t.Logf("no /proc/cpuinfo: %v", err)
		return 0, false
	}
	defer f.Close()
	var mhz float64
	var flags []string
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "cpu MHz":
			mhz, _ = strconv.ParseFloat(strings.TrimSpace(v), 64)
		case "flags":
			flags = strings.Fields(v)
		}
		if mhz != 0 && flags != nil {
			break
		}
	}
	has := func(f string) bool {
		for _, x := range flags {
			if x == f {
				return true
			}
		}
		return false
	}
	if mhz == 0 || !has("tsc_known_freq") || has("aperfmperf") {
		t.Logf("cpu MHz %.3f is not the TSC's rate here (tsc_known_freq %v, aperfmperf %v): not compared", mhz, has("tsc_known_freq"), has("aperfmperf"))
		return 0, false
	}
	return mhz, true
}
