package kvm

// ioctl request numbers and constants from the Linux uapi headers
// <linux/kvm.h> and <asm/kvm.h> (x86-64). golang.org/x/sys/unix does not
// carry them. The encoded sizes inside the _IOR/_IOW numbers are checked
// against the Go struct sizes in the tests.
const (
	kvmGetAPIVersion       = 0xae00
	kvmCreateVM            = 0xae01
	kvmGetMSRIndexList     = 0xc004ae02
	kvmCheckExtension      = 0xae03
	kvmGetVCPUMmapSize     = 0xae04
	kvmGetSupportedCPUID   = 0xc008ae05
	kvmCreateVCPU          = 0xae41
	kvmSetUserMemoryRegion = 0x4020ae46
	kvmSetTSSAddr          = 0xae47
	kvmSetIdentityMapAddr  = 0x4008ae48
	kvmCreateIRQChip       = 0xae60
	kvmIRQLine             = 0x4008ae61
	kvmIRQFD               = 0x4020ae76
	kvmCreatePIT2          = 0x4040ae77
	kvmIOEventFD           = 0x4040ae79
	kvmRun                 = 0xae80
	kvmGetRegs             = 0x8090ae81
	kvmSetRegs             = 0x4090ae82
	kvmGetSregs            = 0x8138ae83
	kvmSetSregs            = 0x4138ae84
	kvmSetMSRs             = 0x4008ae89
	kvmSetFPU              = 0x41a0ae8d
	kvmGetLAPIC            = 0x8400ae8e
	kvmSetLAPIC            = 0x4400ae8f
	kvmSetCPUID2           = 0x4008ae90
)

// APIVersion is the only KVM API version there has ever been.
const APIVersion = 12

// Extensions queried with CheckExtension.
const (
	CapIRQChip        = 0
	CapUserMemory     = 3
	CapSetTSSAddr     = 4
	CapExtCPUID       = 7
	CapNrVCPUs        = 9
	CapIRQFD          = 0x20
	CapPIT2           = 0x21
	CapIOEventFD      = 0x24
	CapMaxVCPUs       = 0x42
	CapImmediateExit  = 0x88
	CapTSCDeadline    = 72
	capSetIdentityMap = 0x25
)

// Exit reasons (kvm_run.exit_reason).
const (
	ExitUnknown       = 0
	ExitException     = 1
	ExitIO            = 2
	ExitHypercall     = 3
	ExitDebug         = 4
	ExitHLT           = 5
	ExitMMIO          = 6
	ExitIRQWindowOpen = 7
	ExitShutdown      = 8
	ExitFailEntry     = 9
	ExitIntr          = 10
	ExitInternalError = 17
	ExitSystemEvent   = 24
)

// System event types (kvm_run.system_event.type).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
)

// kvm_run layout (x86-64).
const (
	runImmediateExit = 1    // __u8 immediate_exit
	runExitReason    = 8    // __u32 exit_reason
	runUnion         = 0x20 // start of the exit union
	runMinSize       = 0x930
)

const (
	ioeventfdFlagDatamatch = 1 << 0
	ioeventfdFlagPIO       = 1 << 1
	ioeventfdFlagDeassign  = 1 << 2
	irqfdFlagDeassign      = 1 << 0
	pitSpeakerDummy        = 1
	memLogDirtyPages       = 1 << 0
)

// Direction of an I/O port exit.
const (
	ExitIOIn  = 0
	ExitIOOut = 1
)
