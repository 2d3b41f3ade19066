package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/krun-core/krun-core/core/kvm"
	"github.com/krun-core/krun-core/core/vmm"
	"github.com/krun-core/krun-core/guest/initramfs/kmod"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/sandbox"
)

const doctorUsage = `usage: krun-core doctor [--output json]

Checks what this host offers krun-core:
  kvm      whether krun-core run can boot a guest here: /dev/kvm exists, is
           backed by hardware virtualization (Intel VT-x or AMD-V with
           kvm_intel or kvm_amd; not kvm_pvm, which runs only PVM guest
           kernels) and opens with the API the core needs
  kernel   the kernel run --root would boot without --kernel ($KRUN_KERNEL,
           /boot/vmlinuz-$(uname -r), then the one make kernel fetched), its
           release and its module tree (what run's initramfs is built from)
  sandbox  which plugin sandbox layers are available (details: krun-core
           sandbox status)

Exit status 0 when krun-core run can work here, 1 when it cannot (krun-core
serve and img need no KVM).`

// doctorReport is doctor's --output json report.
type doctorReport struct {
	KVM struct {
		Usable  bool         `json:"usable"`
		Problem string       `json:"problem,omitempty"`
		Host    kvm.HostInfo `json:"host"`
	} `json:"kvm"`
	Kernel struct {
		Path    string `json:"path,omitempty"`
		Release string `json:"release,omitempty"`
		Modules string `json:"modules,omitempty"`
		Problem string `json:"problem,omitempty"`
	} `json:"kernel"`
	SandboxMissing []string `json:"sandbox_missing"`
}

// findKernel fills r.Kernel: the kernel run would boot without --kernel.
// A kernel is not a condition for run (--kernel gives one), so a problem
// here does not fail doctor.
func (r *doctorReport) findKernel() {
	k := &r.Kernel
	path, err := vmm.FindKernel()
	if err != nil {
		k.Problem = err.Error()
		return
	}
	k.Path = path
	rel, err := kmod.Release(path)
	if err != nil {
		k.Problem = err.Error()
		return
	}
	k.Release = rel
	mods, err := kmod.FindModulesDir(path, rel)
	if err != nil {
		k.Problem = fmt.Sprintf("modules of %s: %v (run --root needs them: give --kernel-modules DIR)", rel, err)
		return
	}
	k.Modules = mods
}

// doctorCommand implements "krun-core doctor".
func doctorCommand(args []string, stdout, stderr io.Writer) int {
	fs := cli.NewFlags("krun-core doctor", doctorUsage)
	output := cli.OutputFlag(fs.FlagSet)
	if rc, done := fs.ParseArgs(args, stdout, stderr); done {
		return rc
	}
	if fs.NArg() > 0 {
		return fs.Failf(stderr, "unexpected argument %q (see %s --help)", fs.Arg(0), "krun-core doctor")
	}
	if err := cli.CheckOutput(*output); err != nil {
		return fs.Fail(stderr, err)
	}
	if _, err := fs.Logger(stderr); err != nil {
		return fs.Fail(stderr, err)
	}
	var r doctorReport
	r.KVM.Host = kvm.ReadHostInfo("/")
	err := kvm.CheckHost()
	r.KVM.Usable = err == nil
	if err != nil {
		r.KVM.Problem = err.Error()
	}
	r.findKernel()
	r.SandboxMissing = []string{}
	for _, l := range sandbox.Status().Layers {
		if !l.Available {
			r.SandboxMissing = append(r.SandboxMissing, string(l.Layer))
		}
	}
	rc := 0
	if !r.KVM.Usable {
		rc = 1
	}
	if err := cli.Report(stdout, *output, r, func(w io.Writer) { writeDoctor(w, r) }); err != nil {
		return fs.Fail(stderr, err)
	}
	return rc
}

func writeDoctor(w io.Writer, r doctorReport) {
	if r.KVM.Usable {
		fmt.Fprintln(w, "kvm: usable (krun-core run can boot guests here)")
	} else {
		fmt.Fprintf(w, "kvm: NOT usable: %s\n", strings.TrimPrefix(r.KVM.Problem, "no usable KVM: "))
	}
	switch k := r.Kernel; {
	case k.Problem != "" && k.Path == "":
		fmt.Fprintf(w, "kernel: none found: %s\n", strings.TrimPrefix(k.Problem, vmm.ErrNoKernel.Error()+": "))
	case k.Problem != "":
		fmt.Fprintf(w, "kernel: %s: %s\n", k.Path, k.Problem)
	default:
		fmt.Fprintf(w, "kernel: %s (release %s, modules in %s)\n", k.Path, k.Release, k.Modules)
	}
	if len(r.SandboxMissing) == 0 {
		fmt.Fprintln(w, "sandbox: every layer available (details: krun-core sandbox status)")
	} else {
		fmt.Fprintf(w, "sandbox: UNAVAILABLE layers %v: plugins refuse to start unless turned off with --sandbox-disable (details: krun-core sandbox status)\n", r.SandboxMissing)
	}
}
