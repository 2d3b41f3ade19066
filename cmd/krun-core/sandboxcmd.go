package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/sandbox"
)

const sandboxUsage = `usage: krun-core sandbox status [--output json] [--kind blk|net|console|fs|img]

Shows which sandbox layers this host supports and, for each built-in plugin
kind, what a plugin is allowed: namespaces, root, resource limits, Landlock
rules and every allowed system call with its argument limits and reason.

A third-party plugin (--plugin KIND on run or serve) starts under the io
profile's filter, the block and net profiles together (the calls --kind
blk and --kind net list; not fs's file-tree calls), with the calls the
user grants with --plugin-syscalls, and narrows it to the policy it
declares; krun-core serve --log-level debug logs that policy's profile.

A layer that is not available makes plugins fail to start (fail closed)
unless the user turns it off with --sandbox-disable on run or serve.`

// sandboxCommand implements "krun-core sandbox".
func sandboxCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "krun-core sandbox: no command given (see krun-core sandbox --help)")
		return 1
	}
	switch args[0] {
	case "-h", "--help", "help":
		if len(args) > 1 && args[0] == "help" && args[1] != "status" {
			fmt.Fprintf(stderr, "krun-core sandbox help: unknown command %q (want status; see krun-core sandbox --help)\n", args[1])
			return 1
		}
		fmt.Fprint(stdout, sandboxUsage+"\n")
		return 0
	case "status":
	default:
		fmt.Fprintf(stderr, "krun-core sandbox: unknown command %q (want status; see krun-core sandbox --help)\n", args[0])
		return 1
	}
	fs := cli.NewFlags("krun-core sandbox status", sandboxUsage)
	output := cli.OutputFlag(fs.FlagSet)
	kind := fs.String("kind", "", "only this plugin `KIND` (blk, net, console, fs or img)")
	if rc, done := fs.ParseArgs(args[1:], stdout, stderr); done {
		return rc
	}
	if fs.NArg() > 0 {
		return fs.Failf(stderr, "unexpected argument %q (see %s --help)", fs.Arg(0), "krun-core sandbox status")
	}
	if err := cli.CheckOutput(*output); err != nil {
		return fs.Fail(stderr, err)
	}
	if _, err := fs.Logger(stderr); err != nil {
		return fs.Fail(stderr, err)
	}
	r := sandbox.Status()
	if *kind != "" {
		i := slices.IndexFunc(r.Kinds, func(k sandbox.KindStatus) bool { return k.Kind == *kind })
		if i < 0 {
			// A plugin author asks for their own kind: say where its
			// rules are rather than only that it is not built in.
			return fs.Failf(stderr, "no built-in plugin kind %q (want %s); a third-party plugin starts under the io profile's filter (the calls of --kind blk and --kind net together), narrowed to the policy it declares",
				*kind, strings.Join(sandbox.BuiltinKinds, ", "))
		}
		r.Kinds = r.Kinds[i : i+1]
	}
	if err := cli.Report(stdout, *output, r, func(w io.Writer) { writeSandboxStatus(w, r) }); err != nil {
		return fs.Fail(stderr, err)
	}
	return 0
}

func writeSandboxStatus(w io.Writer, r sandbox.StatusReport) {
	fmt.Fprintf(w, "Plugin sandbox on Linux %s (%s)\n\nLayers on this host (applied in this order):\n", r.Kernel, r.Arch)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	var missing []string
	for _, l := range r.Layers {
		state := "active"
		if !l.Available {
			state = "UNAVAILABLE"
			missing = append(missing, string(l.Layer))
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", l.Layer, state, l.Detail)
	}
	tw.Flush()
	if len(missing) > 0 {
		fmt.Fprintf(w, "\nPlugins will not start on this host (fail closed) unless run with\n  --sandbox-disable=%s\nwhich weakens the sandbox and prints a warning.\n", strings.Join(missing, ","))
	}
	fmt.Fprintf(w, "\nPlugins run as host %s\n", r.PluginIDs)
	fmt.Fprintf(w, "Shared directories reach them %s\n", r.Shares)
	fmt.Fprintf(w, "krun-core itself, %s\n", r.Core)
	fmt.Fprintf(w, "\nStart-up calls, allowed to every plugin from its first instruction until its own sandbox.Restrict (%d):\n", len(r.Launch))
	for _, s := range r.Launch {
		fmt.Fprintf(w, "    %-18s %s\n", s.Syscall, s.Reason)
		if s.Args != "" {
			fmt.Fprintf(w, "    %-18s only if %s\n", "", s.Args)
		}
	}
	for _, k := range r.Kinds {
		fmt.Fprintf(w, "\nPlugin kind %s (seccomp profile %q)\n", k.Kind, k.Profile)
		fmt.Fprintf(w, "  namespaces: %s (all new)\n", strings.Join(k.Namespaces, ", "))
		fmt.Fprintf(w, "  root:       %s\n", k.Root)
		fmt.Fprintf(w, "  limits:     %s\n", strings.Join(k.Limits, ", "))
		fmt.Fprintf(w, "  landlock:\n")
		for _, l := range k.Landlock {
			fmt.Fprintf(w, "    - %s\n", l)
		}
		fmt.Fprintf(w, "  any other system call: %s\n", k.Refused)
		fmt.Fprintf(w, "  allowed system calls (%d):\n", len(k.Syscalls))
		for _, s := range k.Syscalls {
			fmt.Fprintf(w, "    %-18s %s  [%s]\n", s.Syscall, s.Reason, s.Layer)
			if s.Args != "" {
				fmt.Fprintf(w, "    %-18s only if %s\n", "", s.Args)
			}
		}
	}
}
