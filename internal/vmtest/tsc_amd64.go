package vmtest

const haveTSC = true

// rdtsc returns the TSC (tsc_amd64.s).
func rdtsc() uint64
