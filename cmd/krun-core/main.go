// Command krun-core is the krun-core microVM monitor: it boots guests on KVM
// (run), serves a device plugin to any vhost-user front-end (serve), inspects
// and converts images without trusting them (img), reports the plugin sandbox
// (sandbox) and checks the host (doctor). Benchmarks with the Go test guest
// are a separate program, krun-bench (cmd/krun-bench).
//
// Each subcommand lives in its own file; main only dispatches.
package main

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
)

// command is one subcommand: it gets its arguments (without its name) and
// returns the process exit status.
type command struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

func commands() map[string]command {
	return map[string]command{
		"run":     {"boot a guest on KVM with every device in a plugin", runCommand},
		"serve":   {"serve one device plugin as a vhost-user back-end on a unix socket", serveCommand},
		"img":     {"inspect, verify, create, convert and resize disk images (parsed in the sandboxed plugin)", imgCommand},
		"sandbox": {"show the plugin sandbox layers on this host and each plugin kind's policy", sandboxCommand},
		"doctor":  {"check whether this host can run krun-core guests (KVM, sandbox)", doctorCommand},
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: krun-core COMMAND [options]")
	fmt.Fprintln(w, "       krun-core COMMAND --help")
	fmt.Fprintln(w, "       krun-core --version")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	for _, name := range []string{"run", "serve", "img", "sandbox", "doctor"} {
		fmt.Fprintf(w, "  %-8s %s\n", name, commands()[name].summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Every command takes --log-level (default warn) and --log-format text|json, and")
	fmt.Fprintln(w, "prints its own page with --help. Bad input is one line on stderr and exit")
	fmt.Fprintln(w, "status 1, before anything starts.")
}

func main() {
	os.Exit(dispatch(os.Args[1:], os.Stdout, os.Stderr))
}

func dispatch(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "krun-core: no command given (see krun-core --help)")
		return 1
	}
	switch args[0] {
	case "-h", "--help", "help":
		if len(args) > 1 && args[0] == "help" { // krun-core help CMD
			if args[1] == "help" {
				usage(stdout)
				return 0
			}
			if args[1] == "version" {
				versionUsage(stdout)
				return 0
			}
			if _, ok := commands()[args[1]]; ok {
				// help img create: the page of `img create --help`.
				return dispatch(append(slices.Clone(args[1:]), "--help"), stdout, stderr)
			}
			fmt.Fprintf(stderr, "krun-core help: unknown command %q (see krun-core --help)\n", args[1])
			return 1
		}
		usage(stdout)
		return 0
	case "--version", "-version", "version":
		if len(args) == 2 && (args[1] == "--help" || args[1] == "-h") {
			// Every command prints its page with --help and exits 0
			// (README, "Command line"), version too.
			versionUsage(stdout)
			return 0
		}
		if len(args) > 1 {
			fmt.Fprintf(stderr, "krun-core %s: unexpected argument %q (see krun-core --help)\n", args[0], args[1])
			return 1
		}
		fmt.Fprint(stdout, versionText())
		return 0
	}
	cmd, ok := commands()[args[0]]
	if !ok && args[0] == "bench" {
		fmt.Fprintln(stderr, "krun-core: bench is a program of its own: krun-bench (see krun-bench --help)")
		return 1
	}
	if !ok {
		what := "command"
		if strings.HasPrefix(args[0], "-") {
			what = "option"
		}
		fmt.Fprintf(stderr, "krun-core: unknown %s %q (see krun-core --help)\n", what, args[0])
		return 1
	}
	return cmd.run(args[1:], stdout, stderr)
}

// versionUsage is the page of `krun-core version --help`.
func versionUsage(w io.Writer) {
	fmt.Fprint(w, `usage: krun-core --version (or krun-core version)

Prints krun-core's version (its git revision), the Go release it was built
with and the plugin protocol version its plugins must speak.
`)
}
