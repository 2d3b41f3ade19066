package sandbox

import (
	"testing"

	"golang.org/x/sys/unix"
)

// The host decodes the policy a plugin declares in Describe: bytes from a
// process that may be compromised. Whatever ParsePolicy accepts must be
// valid, forbid nothing it should not and compile to a seccomp filter.
func FuzzParsePolicy(f *testing.F) {
	f.Add([]byte(`{"kind":"blk","syscalls":"block"}`))
	f.Add([]byte(`{"kind":"fs","syscalls":"fs","read_write_dir_fds":[5]}`))
	f.Add([]byte(`{"kind":"x","syscalls":"minimal","extra_syscalls":[{"name":"sysinfo","reason":"r"}]}`))
	f.Add([]byte(`{"kind":"x","syscalls":"net","extra_syscalls":[{"name":"execve","reason":"r"}]}`))
	f.Add([]byte(`{"kind":"x","syscalls":"net","read_only_dir_fds":[-1]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePolicy(b)
		if err != nil {
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("accepted policy does not validate: %v", err)
		}
		rules, err := policyRules(p)
		if err != nil {
			t.Fatalf("accepted policy has no rules: %v", err)
		}
		for _, r := range rules {
			for _, f := range ForbiddenSyscalls() {
				if r.name == f {
					t.Fatalf("accepted policy allows %s", f)
				}
			}
		}
		prog, err := compileFilter(filterSpec{arch: auditArch, x32Bit: x32SyscallBit, self: 1, rules: rules,
			nums: syscallNumbers(), deny: testDeny, wrongArch: testWrong})
		if err != nil {
			t.Fatalf("accepted policy does not compile: %v", err)
		}
		if _, err := runBPF(prog, seccompData(auditArch, syscallNumbers()["execve"])); err != nil {
			t.Fatal(err)
		}
		// The same policy, stacked on the trampoline's filter by Restrict.
		outer, err := launchRules(launchEnv{Syscalls: ProfileFS, ExecFD: 9})
		if err != nil {
			t.Fatal(err)
		}
		narrow, err := compileNarrowing(narrowSpec{arch: auditArch, x32Bit: x32SyscallBit, self: 1, outer: outer,
			inner: rules, nums: syscallNumbers(), deny: unix.SECCOMP_RET_ERRNO | 1})
		if err != nil {
			t.Fatalf("accepted policy does not compile as a narrowing filter: %v", err)
		}
		if _, err := runBPF(narrow, seccompData(auditArch, syscallNumbers()["socket"], unix.AF_UNIX, unix.SOCK_STREAM)); err != nil {
			t.Fatal(err)
		}
	})
}
