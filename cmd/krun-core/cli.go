package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/proto/pluginpb"
)

// The rules every sub-command follows (README, "Command line"):
//
//   - --help (or -h) prints the command's own page on stdout and exits 0;
//     flags are spelled with two dashes.
//   - Bad input (an unknown flag, a bad value, a missing file) is one line
//     on stderr, "krun-core CMD: PROBLEM", and exit status 1, before
//     anything starts. The one exception is run with a command after "--",
//     whose own failures exit 125 because the command's status is passed
//     through.
//   - --log-level (default warn) and --log-format text|json, on every
//     sub-command; the log goes to stderr.
//   - --output human|json where a command prints a report.

// defaultLogLevel is every sub-command's --log-level default.
const defaultLogLevel = "warn"

// cmdFlags is a sub-command's flag set, with the rules above.
type cmdFlags struct {
	*flag.FlagSet
	name     string // "krun-core run", for messages
	synopsis string // the help page before the option list
	level    string
	format   string
}

// newCmdFlags makes the flag set of the command name ("krun-core run")
// with --log-level and --log-format; synopsis starts its help page.
func newCmdFlags(name, synopsis string) *cmdFlags {
	f := &cmdFlags{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), name: name, synopsis: synopsis}
	f.SetOutput(io.Discard)
	f.Usage = func() {}
	f.StringVar(&f.level, "log-level", defaultLogLevel, "log `LEVEL`: trace, debug, info, warn or error")
	f.StringVar(&f.format, "log-format", "text", "log `FORMAT`: text, or json for hclog's JSON lines")
	return f
}

// parse parses args. done is true when the command ends here: its help page
// was asked for (status 0) or the flags are bad (status 1, one line).
func (f *cmdFlags) parse(args []string, stdout, stderr io.Writer) (status int, done bool) {
	err := f.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		f.help(stdout)
		return 0, true
	}
	if err != nil {
		return f.fail(stderr, f.flagError(err)), true
	}
	return 0, false
}

// fail prints err as the command's one line and returns status 1.
func (f *cmdFlags) fail(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "%s: %s\n", f.name, oneLine(err.Error()))
	return 1
}

// failf is fail with a format.
func (f *cmdFlags) failf(stderr io.Writer, format string, a ...any) int {
	return f.fail(stderr, fmt.Errorf(format, a...))
}

// logger builds the command's logger from --log-level and --log-format.
func (f *cmdFlags) logger(stderr io.Writer) (hclog.Logger, error) {
	return newLogger(f.level, f.format, stderr)
}

// help prints the command's page: the synopsis, then every option.
func (f *cmdFlags) help(w io.Writer) {
	fmt.Fprint(w, strings.TrimRight(f.synopsis, "\n")+"\n\noptions:\n")
	printOptions(w, f.FlagSet)
}

// flagNameRE finds the flag name in the flag package's messages, which
// spell it with one dash.
var flagNameRE = regexp.MustCompile(`(not defined: |needs an argument: |for flag )-([^\s:]+)`)

// flagError rewrites a flag package error in this command line's spelling
// (two dashes) and points at the help page.
func (f *cmdFlags) flagError(err error) error { return flagError(f.name, err) }

// flagError rewrites a flag package error of the command cmd ("krun-core
// run") in the command line's spelling and points at its help page.
func flagError(cmd string, err error) error {
	s := flagNameRE.ReplaceAllStringFunc(err.Error(), func(m string) string {
		sub := flagNameRE.FindStringSubmatch(m)
		return sub[1] + dashed(sub[2])
	})
	s = strings.Replace(s, "flag provided but not defined: ", "unknown flag ", 1)
	s = strings.Replace(s, "flag needs an argument: ", "a value is needed for ", 1)
	return fmt.Errorf("%s (see %s --help)", s, cmd)
}

// dashed spells a flag name as the help pages do: --name, or -x for a
// one-letter alias.
func dashed(name string) string {
	if len(name) == 1 {
		return "-" + name
	}
	return "--" + name
}

// newLogger builds a logger for --log-level and --log-format.
func newLogger(level, format string, w io.Writer) (hclog.Logger, error) {
	lv := hclog.LevelFromString(level)
	if lv == hclog.NoLevel || lv == hclog.Off {
		return nil, fmt.Errorf("--log-level=%q: want trace, debug, info, warn or error", level)
	}
	var asJSON bool
	switch format {
	case "text":
	case "json":
		asJSON = true
	default:
		return nil, fmt.Errorf("--log-format=%q: want text or json", format)
	}
	return hclog.New(&hclog.LoggerOptions{Name: "krun-core", Level: lv, Output: w, JSONFormat: asJSON}), nil
}

// outputFlag registers --output human|json.
func outputFlag(fs *flag.FlagSet) *string {
	return fs.String("output", "human", "output `FORMAT`: human, or json")
}

func checkOutput(v string) error {
	if v != "human" && v != "json" {
		return fmt.Errorf("--output=%q: want human or json", v)
	}
	return nil
}

// printOptions lists the flags of fs with two dashes, their value names
// and defaults. A flag with an empty usage is an alias (-f for --format)
// and is not listed.
func printOptions(w io.Writer, fs *flag.FlagSet) {
	type row struct{ left, usage string }
	var rows []row
	width := 0
	fs.VisitAll(func(fl *flag.Flag) {
		if fl.Usage == "" {
			return
		}
		name, usage := flag.UnquoteUsage(fl)
		left := dashed(fl.Name)
		if name != "" {
			left += " " + strings.ToUpper(name)
		}
		switch fl.DefValue {
		case "", "false", "0", "0s":
		default:
			def := fl.DefValue
			if strings.ContainsAny(def, " \t") {
				def = fmt.Sprintf("%q", def)
			}
			usage += " (default " + def + ")"
		}
		rows = append(rows, row{left, usage})
		width = max(width, len(left))
	})
	width = min(width, 26)
	const lineWidth = 80
	for _, r := range rows {
		lines := wrap(r.usage, lineWidth-width-4)
		if len(r.left) > width {
			fmt.Fprintf(w, "  %s\n", r.left)
			for _, l := range lines {
				fmt.Fprintf(w, "  %-*s  %s\n", width, "", l)
			}
			continue
		}
		for i, l := range lines {
			left := ""
			if i == 0 {
				left = r.left
			}
			fmt.Fprintf(w, "  %-*s  %s\n", width, left, l)
		}
	}
}

// wrap breaks s into lines of at most n bytes at spaces.
func wrap(s string, n int) []string {
	var lines []string
	var cur strings.Builder
	for _, word := range strings.Fields(s) {
		if cur.Len() > 0 && cur.Len()+1+len(word) > n {
			lines = append(lines, cur.String())
			cur.Reset()
		}
		if cur.Len() > 0 {
			cur.WriteByte(' ')
		}
		cur.WriteString(word)
	}
	if cur.Len() > 0 || len(lines) == 0 {
		lines = append(lines, cur.String())
	}
	return lines
}

// buildVersion may be set at link time (-ldflags "-X main.buildVersion=v1.2.3").
var buildVersion string

// versionText is what --version prints: the version, the commit it was
// built from, the Go release and the plugin protocol version.
func versionText() string {
	v, rev, dirty := "(devel)", "", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
	}
	if buildVersion != "" {
		v = buildVersion
	}
	var b strings.Builder
	fmt.Fprintf(&b, "krun-core %s", v)
	if rev != "" {
		fmt.Fprintf(&b, " commit %.12s", rev)
		if dirty {
			b.WriteString(" (modified)")
		}
	}
	fmt.Fprintf(&b, ", %s, plugin protocol %d\n", runtime.Version(), pluginpb.ProtocolVersion)
	return b.String()
}
