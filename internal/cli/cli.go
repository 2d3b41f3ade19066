// Package cli holds the command-line conventions krun-core's commands
// share (cmd/krun-core, cmd/krun-bench): flag sets with --help pages,
// --log-level and --log-format, one-line errors, --output.
package cli

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
)

// The rules every command follows (README, "Command line"):
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

// DefaultLogLevel is every command's --log-level default.
const DefaultLogLevel = "warn"

// Flags is a command's flag set, with the rules above.
type Flags struct {
	*flag.FlagSet
	name     string // "krun-core run", for messages
	synopsis string // the help page before the option list
	level    string
	format   string
}

// NewFlags makes the flag set of the command name ("krun-core run") with
// --log-level and --log-format; synopsis starts its help page.
func NewFlags(name, synopsis string) *Flags {
	f := &Flags{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), name: name, synopsis: synopsis}
	f.SetOutput(io.Discard)
	f.Usage = func() {}
	f.StringVar(&f.level, "log-level", DefaultLogLevel, "log `LEVEL`: trace, debug, info, warn or error")
	f.StringVar(&f.format, "log-format", "text", "log `FORMAT`: text, or json for hclog's JSON lines")
	return f
}

// ParseArgs parses args. done is true when the command ends here: its help page
// was asked for (status 0) or the flags are bad (status 1, one line).
func (f *Flags) ParseArgs(args []string, stdout, stderr io.Writer) (status int, done bool) {
	err := f.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		f.Help(stdout)
		return 0, true
	}
	if err != nil {
		return f.Fail(stderr, f.FlagError(err)), true
	}
	return 0, false
}

// Fail prints err as the command's one line and returns status 1.
func (f *Flags) Fail(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "%s: %s\n", f.name, OneLine(err.Error()))
	return 1
}

// Failf is Fail with a format.
func (f *Flags) Failf(stderr io.Writer, format string, a ...any) int {
	return f.Fail(stderr, fmt.Errorf(format, a...))
}

// Logger builds the command's logger from --log-level and --log-format,
// named after the program ("krun-core").
func (f *Flags) Logger(stderr io.Writer) (hclog.Logger, error) {
	return NewLogger(strings.Fields(f.name)[0], f.level, f.format, stderr)
}

// Help prints the command's page: the synopsis, then every option.
func (f *Flags) Help(w io.Writer) {
	fmt.Fprint(w, strings.TrimRight(f.synopsis, "\n")+"\n\noptions:\n")
	PrintOptions(w, f.FlagSet)
}

// flagNameRE finds the flag name in the flag package's messages, which
// spell it with one dash.
var flagNameRE = regexp.MustCompile(`(not defined: |needs an argument: |for flag |boolean value "[^"]*" for )-([^\s:]+)`)

// FlagError rewrites a flag package error in this command line's spelling
// (two dashes) and points at the help page.
func (f *Flags) FlagError(err error) error { return FlagError(f.name, err) }

// FlagError rewrites a flag package error of the command cmd ("krun-core
// run") in the command line's spelling and points at its help page.
func FlagError(cmd string, err error) error {
	s := flagNameRE.ReplaceAllStringFunc(err.Error(), func(m string) string {
		sub := flagNameRE.FindStringSubmatch(m)
		if strings.HasPrefix(sub[1], "boolean value") {
			return sub[1] + "flag " + dashed(sub[2])
		}
		return sub[1] + dashed(sub[2])
	})
	// The flag package's own reasons say little: name what was wanted
	// where the message tells the flag's type (a boolean's does; a
	// number's and a duration's read alike, so "parse error" stays).
	if strings.Contains(s, "invalid boolean value ") && strings.HasSuffix(s, ": parse error") {
		s = strings.Replace(s, "invalid boolean value ", "invalid value ", 1)
		s = strings.TrimSuffix(s, "parse error") + "want true or false"
	} else if strings.HasSuffix(s, ": value out of range") {
		s = strings.TrimSuffix(s, "value out of range") + "out of range"
	}
	if name, ok := strings.CutPrefix(err.Error(), "flag provided but not defined: -"); ok && name != "" && name[0] >= '0' && name[0] <= '9' {
		// -1G: a negative number where flags are read, not a flag.
		return fmt.Errorf("-%s is read as a flag here: a negative value goes after -- (see %s --help)", name, cmd)
	}
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

// NewLogger builds the logger of program name ("krun-core") for
// --log-level and --log-format.
func NewLogger(name, level, format string, w io.Writer) (hclog.Logger, error) {
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
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: lv, Output: w, JSONFormat: asJSON}), nil
}

// OutputFlag registers --output human|json.
func OutputFlag(fs *flag.FlagSet) *string {
	return fs.String("output", "human", "output `FORMAT`: human, or json")
}

// CheckOutput checks the value of --output.
func CheckOutput(v string) error {
	if v != "human" && v != "json" {
		return fmt.Errorf("--output=%q: want human or json", v)
	}
	return nil
}

// WriteJSON writes v to w as indented JSON (what --output json prints).
func WriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// Report prints v as --output asks: indented JSON, or human for "human".
func Report(w io.Writer, output string, v any, human func(io.Writer)) error {
	if output == "json" {
		return WriteJSON(w, v)
	}
	human(w)
	return nil
}

// PrintOptions lists the flags of fs with two dashes, their value names
// and defaults. A flag with an empty usage is an alias (-f for --format)
// and is not listed.
func PrintOptions(w io.Writer, fs *flag.FlagSet) {
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

// Printable returns text from a plugin or a guest as it may appear in a
// log: with a line break, a carriage return or another control character
// (an escape sequence) it is quoted, so that it cannot rewrite the user's
// terminal or start what looks like another component's line. Text that
// is not valid UTF-8 is quoted too: a lone byte 0x80-0x9f is a C1 control
// (0x9b CSI, 0x9d OSC) to a terminal in an 8-bit mode. So is text with an
// invisible format character (bidirectional overrides and isolates,
// zero-width characters: Unicode's Cf) or a line or paragraph separator,
// which a terminal that does bidi could use to reorder what it shows.
func Printable(s string) string {
	if !utf8.ValidString(s) || strings.ContainsFunc(s, unprintable) {
		return strconv.Quote(s)
	}
	return s
}

func unprintable(r rune) bool {
	switch {
	case r == '\t':
		return false
	case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
		return true
	}
	return r >= 0xa0 && unicode.In(r, unicode.Cf, unicode.Zl, unicode.Zp)
}

// OneLine folds s (an error message that may span lines) into one line.
// Control and invisible formatting characters left (an escape sequence in
// a file name the user gave, say) are written as Go escapes (\x1b), so
// that the line cannot drive the terminal it is printed on.
func OneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if !strings.ContainsFunc(s, unprintable) && utf8.ValidString(s) {
		return s
	}
	var b strings.Builder
	for len(s) > 0 {
		r, n := utf8.DecodeRuneInString(s)
		switch {
		case r == utf8.RuneError && n == 1:
			fmt.Fprintf(&b, "\\x%02x", s[0])
		case unprintable(r):
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		default:
			b.WriteString(s[:n])
		}
		s = s[n:]
	}
	return b.String()
}

// DecimalInt defines an int flag read in decimal only, within lo..hi: Go's
// flag.Int reads 010 as 8 and takes 0x, 0b and 1_0, so `--cpus 010` asked
// for 8 vCPUs.
func DecimalInt(fs *flag.FlagSet, name string, def, lo, hi int, usage string) *int {
	v := def
	fs.Func(name, usage, func(s string) error {
		n, err := strconv.ParseUint(s, 10, 31)
		if err != nil || int(n) < lo || int(n) > hi {
			return fmt.Errorf("want a decimal number from %d to %d%s", lo, hi, unitOf(usage))
		}
		v = int(n)
		return nil
	})
	fs.Lookup(name).DefValue = strconv.Itoa(def) // help shows it, as flag.Int's
	return &v
}

// Once makes the flags named (one flag and its aliases, such as "f" and
// "format") refuse a second value: for a policy an upload gate enforces
// (img verify --max-size), a second value given later (a wrapper's cap,
// then the caller's arguments) must not loosen the first in silence.
// Call it after the flags are defined.
func Once(fs *flag.FlagSet, names ...string) {
	set := new(bool)
	for _, n := range names {
		f := fs.Lookup(n)
		if f == nil {
			panic("cli.Once: no flag " + n)
		}
		f.Value = &onceValue{Value: f.Value, set: set, names: names}
	}
}

type onceValue struct {
	flag.Value
	set   *bool
	names []string
}

func (o *onceValue) Set(s string) error {
	if *o.set {
		return fmt.Errorf("given twice (--%s takes one value)", o.names[len(o.names)-1])
	}
	*o.set = true
	return o.Value.Set(s)
}

// IsBoolFlag keeps a boolean flag boolean (-x without a value).
func (o *onceValue) IsBoolFlag() bool {
	b, ok := o.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// unitOf returns " " and the word after the back-quoted name in a flag's
// usage ("`N` vCPUs (1..255)" gives " vCPUs"), or "".
func unitOf(usage string) string {
	_, after, ok := strings.Cut(usage, "` ")
	if !ok {
		return ""
	}
	word, _, _ := strings.Cut(after, " ")
	return " " + word
}

// Get is the wrapped value's (flag.Getter), where it has one.
func (o *onceValue) Get() any {
	if g, ok := o.Value.(flag.Getter); ok {
		return g.Get()
	}
	return nil
}
