package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"github.com/krun-core/krun-core/core/devspec"
	"github.com/krun-core/krun-core/core/imagelock"
	"github.com/krun-core/krun-core/core/pluginhost"
	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/imgtool"
	"github.com/krun-core/krun-core/internal/cli"
	"github.com/krun-core/krun-core/sandbox"
)

const imgUsage = `usage: krun-core img COMMAND [options] FILE...

Inspects, verifies, creates and converts disk images. Every image byte is
parsed in the sandboxed plugin krun-plugin-img, which is handed the files
krun-core opened and opens nothing itself. No command guesses a format
(except probe) and none opens a backing file it was not given.

commands:
  info     --format FMT [--output json] [-U] FILE
  check    --format FMT [--repair leaks|all] [--output json] [-U] FILE
  verify   --format FMT [--no-backing | --backing-dir DIR] [--max-size SIZE] [-U] FILE
  create   --format qcow2|raw [--backing FILE --backing-format FMT]
           [--cluster-size N] [--compression zlib|zstd] FILE [SIZE]
  convert  --format FMT -O OUTFMT [--backing FILE --backing-format FMT]...
           [--data-file FILE] [--compress] [--compression zlib|zstd]
           [--cluster-size N] [--progress] [-U] IN OUT
  import   [--from-format raw] --format qcow2|raw --max-size SIZE [--compress]
           [--compression zlib|zstd] [--cluster-size N] [--progress] OUT < CONTENT
  resize   --format raw|qcow2 [--backing FILE --backing-format FMT]...
           [--shrink] FILE [+|-]SIZE
  probe    [-U] FILE

options of every command:
  --plugin-dir DIR          look for krun-plugin-img here first (also $KRUN_PLUGIN_DIR;
                            then the directory of krun-core)
  --sandbox on|off          the plugin sandbox (default on)
  --sandbox-disable LAYERS  turn off some layers: namespaces,root,landlock,seccomp or all
  --log-level LEVEL         trace, debug, info, warn (default), error
  --log-format FORMAT       text (default), or json for hclog's JSON lines

Images are locked as QEMU locks them: a command that only reads an image is
refused while another process (krun-core serve, QEMU, qemu-storage-daemon)
writes it, and check --repair and resize are refused while anyone uses it.
-U, --force-share (info, check without --repair, verify, convert, probe) reads
an image even while it is written, as qemu-img -U does; what it reports may
then be inconsistent.

Each command has its own page: krun-core img COMMAND --help. The short
forms qemu-img users know work too: -f FMT, -O OUTFMT, -b FILE, -F FMT, -c,
-p, -r. Sizes take binary suffixes: 512, 64K, 10M, 64G, 2T. See
docs/IMAGES.md.
`

// imgCommonOptions ends every img command's page.
const imgCommonOptions = `
options of every img command:
  --plugin-dir DIR          look for krun-plugin-img here first (also $KRUN_PLUGIN_DIR;
                            then the directory of krun-core)
  --sandbox on|off          the plugin sandbox (default on)
  --sandbox-disable LAYERS  turn off some layers: namespaces,root,landlock,seccomp or all
  --log-level LEVEL         trace, debug, info, warn (default), error
  --log-format FORMAT       text (default), or json for hclog's JSON lines

Images are locked as QEMU locks them: a command that only reads an image is
refused while another process (krun-core serve, QEMU, qemu-storage-daemon)
writes it, and check --repair and resize are refused while anyone uses it.
-U, --force-share (info, check without --repair, verify, convert, probe) reads
an image even while it is written, as qemu-img -U does; what it reports may
then be inconsistent.

Sizes take binary suffixes: 512, 64K, 10M, 64G, 2T. See docs/IMAGES.md.
`

// imgHelp is each img command's own page (before imgCommonOptions).
var imgHelp = map[string]string{
	"info": `usage: krun-core img info --format FMT [--output json] [-U] FILE

Reports the format, virtual and actual size, cluster size, the backing file
as recorded (never opened), the dirty flag, snapshots and format-specific
facts. --output json uses qemu-img info's keys.

  -f, --format FMT   the image's format, raw or qcow2 (required; never guessed)
  --output FORMAT    human (default), or json
`,
	"check": `usage: krun-core img check --format FMT [--repair leaks|all] [--output json] [-U] FILE

Checks a qcow2 image's metadata (refcounts against references, table
entries). Exit status as qemu-img check: 0 clean, 1 check failed, 2
corruption, 3 leaks only, 63 no metadata to check (raw).

  -f, --format FMT       the image's format (required; never guessed)
  -r, --repair leaks|all lower leaked refcounts; all also fixes the rest
  --output FORMAT        human (default), or json (qemu-img check's keys)
`,
	"verify": `usage: krun-core img verify --format FMT [--no-backing | --backing-dir DIR] [--max-size SIZE] [-U] FILE

The upload gate: exit 0 and one line on stdout if FILE is a valid image of
the claimed format that meets every policy; otherwise exit 1 with one line
naming the first violation.

  -f, --format FMT     the claimed format (required; never guessed)
  --max-size SIZE      the virtual size must not exceed SIZE
  --no-backing         the image must not record a backing file
  --backing-dir DIR    a recorded backing file must lie inside DIR
`,
	"create": `usage: krun-core img create --format qcow2|raw [options] FILE [SIZE]

Creates a new image FILE, which must not exist (img never overwrites):
qcow2 version 3 with 64 KiB clusters unless --cluster-size says otherwise.
SIZE may follow FILE as with qemu-img (img create -f qcow2 disk.qcow2 10G),
or be given with --size.

  -f, --format FMT          qcow2 or raw (required)
  --size SIZE               the virtual size (or SIZE after FILE; taken from
                            the backing file when neither is given)
  -b, --backing FILE        record FILE as the backing file (needs --backing-format)
  -F, --backing-format FMT  the backing file's format
  --cluster-size N          512 to 2M, a power of two
  --compression zlib|zstd   the compression type for compressed clusters
`,
	"convert": `usage: krun-core img convert --format FMT -O OUTFMT [options] [-U] IN OUT

Copies IN's virtual content into a new image OUT (which must not exist). A
qcow2 input's backing chain is flattened and must be declared, nearest
first; nothing is opened by the name an image records.

  -f, --format FMT          IN's format (required; never guessed)
  -O OUTFMT                 OUT's format, raw or qcow2 (required)
  -b, --backing FILE        a backing file of IN (repeatable, nearest first)
  -F, --backing-format FMT  the format of the --backing before it
  --data-file FILE          IN's external data file
  -c, --compress            compress OUT's clusters (-O qcow2)
  --compression zlib|zstd   the compression type (default zlib)
  --cluster-size N          OUT's cluster size
  -p, --progress            a progress bar on stderr when it is a terminal
`,
	"import": `usage: krun-core img import [--from-format raw] --format qcow2|raw --max-size SIZE [options] OUT < CONTENT

Streams raw guest-visible content from stdin (not a terminal) into a new
image OUT; the size cap holds while the content streams in.

  --from-format raw         the content's format (only raw)
  -f, --format FMT          OUT's format, qcow2 or raw (required)
  --max-size SIZE           refuse content larger than SIZE (required)
  -c, --compress            compress OUT's clusters (qcow2)
  --compression zlib|zstd   the compression type (default zlib)
  --cluster-size N          OUT's cluster size
  -p, --progress            a progress bar on stderr when it is a terminal
`,
	"resize": `usage: krun-core img resize --format raw|qcow2 [--backing FILE --backing-format FMT]... [--shrink] FILE [+|-]SIZE

Changes FILE's virtual size in place, as qemu-img resize does: to SIZE, or
by +SIZE or -SIZE from the current size. The new size must be a multiple of
512. FILE is opened read-write under its exclusive lock, so an image in use
(served, open in QEMU) is refused. A raw file grows sparsely; shrinking it
cuts off its end and needs --shrink. A qcow2 image only grows, and not one
with internal snapshots, bitmaps or an external data file. A qcow2 image
with a backing file grows only with its chain declared, nearest first, as
for convert (nothing is opened by the name the image records): the new
area is zeroed over the backing file's data. Partitions and file systems
inside the image are not touched: grow them from the guest.

  -f, --format FMT          the image's format, raw or qcow2 (required; never guessed)
  -b, --backing FILE        a backing file of FILE (repeatable, nearest first)
  -F, --backing-format FMT  the format of the --backing before it
  --shrink                  allow a smaller size (raw); the data beyond it is lost
`,
	"probe": `usage: krun-core img probe [-U] FILE

Guesses FILE's format from its content (the one command that guesses) and
warns: record the answer and pass --format from then on.
`,
}

// imgSubcommands maps each img command to its implementation.
func imgSubcommands() map[string]func(args []string, stdout, stderr io.Writer) int {
	return map[string]func([]string, io.Writer, io.Writer) int{
		"info":    imgInfo,
		"check":   imgCheck,
		"verify":  imgVerify,
		"create":  imgCreate,
		"convert": imgConvert,
		"import":  imgImport,
		"resize":  imgResize,
		"probe":   imgProbe,
	}
}

// imgCommand implements `krun-core img`.
func imgCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "krun-core img: no command given (see krun-core img --help)")
		return 1
	}
	switch args[0] {
	case "-h", "--help", "help":
		if len(args) > 1 && imgHelp[args[1]] != "" { // img help COMMAND
			fmt.Fprint(stdout, imgHelp[args[1]]+imgCommonOptions)
			return 0
		}
		if len(args) > 1 && args[0] == "help" {
			fmt.Fprintf(stderr, "krun-core img help: unknown command %q (see krun-core img --help)\n", args[1])
			return 1
		}
		fmt.Fprint(stdout, imgUsage)
		return 0
	}
	sub, ok := imgSubcommands()[args[0]]
	if !ok {
		names := make([]string, 0, 8)
		for n := range imgSubcommands() {
			names = append(names, n)
		}
		sort.Strings(names)
		fmt.Fprintf(stderr, "krun-core img: unknown command %q (want %s; see krun-core img --help)\n", args[0], strings.Join(names, ", "))
		return 1
	}
	return sub(args[1:], stdout, stderr)
}

// imgFlags is a flag set with the options every img command takes.
type imgFlags struct {
	name       string
	fs         *flag.FlagSet
	pluginDir  string
	sandboxOn  string
	disable    string
	logLevel   string
	logFormat  string
	forceShare bool
	positional []string
}

func newImgFlags(name string) *imgFlags {
	f := &imgFlags{name: name, fs: flag.NewFlagSet("img "+name, flag.ContinueOnError)}
	f.fs.SetOutput(io.Discard)
	f.fs.StringVar(&f.pluginDir, "plugin-dir", "", "")
	f.fs.StringVar(&f.sandboxOn, "sandbox", "on", "")
	f.fs.StringVar(&f.disable, "sandbox-disable", "", "")
	f.fs.StringVar(&f.logLevel, "log-level", cli.DefaultLogLevel, "")
	f.fs.StringVar(&f.logFormat, "log-format", "text", "")
	return f
}

// allowForceShare registers --force-share and its short form -U, for
// commands that only read images.
func (f *imgFlags) allowForceShare() {
	f.fs.BoolVar(&f.forceShare, "force-share", false, "")
	f.fs.BoolVar(&f.forceShare, "U", false, "")
}

// parse parses flags and positional arguments in any order ("--" ends the
// flags) and checks the number of positional arguments; a name in brackets
// ("[SIZE]") is optional.
func (f *imgFlags) parse(args []string, positional ...string) error {
	for {
		if err := f.fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return err
			}
			switch err.Error() {
			case "flag provided but not defined: -o":
				// qemu-img's -o cluster_size=...,backing_file=...
				return fmt.Errorf("-o is qemu-img's: krun-core img %s takes each option as a flag of its own (see krun-core img %s --help)", f.name, f.name)
			case "flag provided but not defined: -B":
				// qemu-img convert -B: a backing file for the output
				return fmt.Errorf("-B is qemu-img's: krun-core img %s writes no backing file into its output; a backing chain is declared with --backing, and an overlay made with img create --backing (see krun-core img %s --help)", f.name, f.name)
			case "flag provided but not defined: -S":
				// qemu-img convert -S: the run of zeros left unwritten
				return fmt.Errorf("-S is qemu-img's: krun-core img %s takes no sparseness setting; all-zero 4 KiB blocks and clusters are always left unwritten (see krun-core img %s --help)", f.name, f.name)
			}
			return cli.FlagError("krun-core img "+f.name, err)
		}
		rest := f.fs.Args()
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			f.positional = append(f.positional, rest...)
			break
		}
		if len(rest) == 0 {
			break
		}
		f.positional = append(f.positional, rest[0])
		args = rest[1:]
	}
	// A string option given an empty value (a shell variable that
	// expanded to nothing) is refused, not read as "not given" (from
	// review, helper-89).
	var empty string
	f.fs.Visit(func(fl *flag.Flag) {
		if g, ok := fl.Value.(flag.Getter); ok && empty == "" {
			if v, ok := g.Get().(string); ok && v == "" {
				empty = fl.Name
			}
		}
	})
	if empty != "" {
		return cli.FlagError("krun-core img "+f.name, fmt.Errorf("invalid value \"\" for flag -%s: an empty value", empty))
	}
	required := 0
	for _, p := range positional {
		if !strings.HasPrefix(p, "[") {
			required++
		}
	}
	if n := len(f.positional); n < required || n > len(positional) {
		want := fmt.Sprint(required)
		if required != len(positional) {
			want = fmt.Sprintf("%d or %d", required, len(positional))
		}
		return fmt.Errorf("want %s argument(s) (%s), got %d", want, strings.Join(positional, " "), len(f.positional))
	}
	// An empty argument, as an empty option above: `img info -f raw
	// "$IMG"` with IMG unset said "image: open : no such file or
	// directory".
	for i, p := range f.positional {
		if p == "" {
			return fmt.Errorf("the %s argument is empty (see krun-core img %s --help)", strings.Trim(positional[i], "[]"), f.name)
		}
	}
	return nil
}

// launcher builds the plugin launcher from the common options.
func (f *imgFlags) launcher(stderr io.Writer) (*imgtool.Launcher, error) {
	log, err := cli.NewLogger("krun-core", f.logLevel, f.logFormat, stderr)
	if err != nil {
		return nil, err
	}
	if err := pluginhost.CheckSearchPath(f.pluginDir); err != nil {
		return nil, err
	}
	l := &imgtool.Launcher{PluginDir: f.pluginDir, Logger: log, ForceShare: f.forceShare}
	layers, err := sandbox.ParseLayers(f.disable)
	if err != nil {
		return nil, fmt.Errorf("--sandbox-disable: %w", err)
	}
	switch f.sandboxOn {
	case "on":
		l.Sandbox = sandbox.LaunchConfig{Kind: "img", Disable: layers, Log: log}
	case "off":
		if len(layers) > 0 {
			return nil, errors.New("--sandbox=off already turns every layer off; drop --sandbox-disable")
		}
		l.SandboxOff = true
		fmt.Fprintln(stderr, "krun-core img: warning: --sandbox=off: the image plugin parses untrusted images unconfined, with krun-core's privileges")
	default:
		return nil, fmt.Errorf("--sandbox=%q: want on or off", f.sandboxOn)
	}
	return l, nil
}

// sizeFlag is a flag holding a byte count with an optional binary suffix.
type sizeFlag struct{ n int64 }

func (s *sizeFlag) String() string { return fmt.Sprint(s.n) }
func (s *sizeFlag) Set(v string) error {
	n, err := devspec.ParseSize(v)
	if err != nil {
		return err
	}
	s.n = n
	return nil
}

// imgRun runs one img command body with a context cancelled by SIGINT and
// SIGTERM, and turns its error into one line and exit status 1.
func imgRun(name string, args []string, stdout, stderr io.Writer, f *imgFlags, positional []string,
	body func(ctx context.Context, l *imgtool.Launcher) (int, error)) int {
	fail := func(err error) int {
		fmt.Fprintf(stderr, "krun-core img %s: %s\n", name, oneLineErr(err))
		return 1
	}
	if err := f.parse(args, positional...); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, imgHelp[name]+imgCommonOptions)
			return 0
		}
		if strings.Contains(err.Error(), "--help)") {
			return fail(err)
		}
		return fail(fmt.Errorf("%w (see krun-core img %s --help)", err, name))
	}
	l, err := f.launcher(stderr)
	if err != nil {
		return fail(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	code, err := body(ctx, l)
	if err != nil {
		if ctx.Err() != nil {
			return fail(errors.New("interrupted"))
		}
		var inUse *imagelock.InUseError
		if errors.As(err, &inUse) && inUse.Mode == imagelock.ReadOnly && f.fs.Lookup("force-share") != nil && !f.forceShare {
			err = fmt.Errorf("%w; -U (--force-share) reads it all the same, as with qemu-img, at the risk of reading it mid-write", err)
		}
		return fail(err)
	}
	return code
}

func oneLineErr(err error) string {
	return cli.OneLine(err.Error()) // a line break in a file name must not cut off the reason
}

// formatFlag registers --format and its short form -f.
func formatFlag(fs *flag.FlagSet) *string {
	v := new(string)
	fs.StringVar(v, "format", "", "")
	fs.StringVar(v, "f", "", "")
	return v
}

func requireFormat(v string) error {
	if v == "" {
		return errors.New("--format is required: krun-core never guesses a format (run krun-core img probe once on a file you trust, then record the answer)")
	}
	return nil
}

func imgInfo(args []string, stdout, stderr io.Writer) int {
	f := newImgFlags("info")
	f.allowForceShare()
	format := formatFlag(f.fs)
	output := cli.OutputFlag(f.fs)
	return imgRun("info", args, stdout, stderr, f, []string{"FILE"}, func(ctx context.Context, l *imgtool.Launcher) (int, error) {
		if err := requireFormat(*format); err != nil {
			return 1, err
		}
		if err := cli.CheckOutput(*output); err != nil {
			return 1, err
		}
		in, err := l.Info(ctx, f.positional[0], *format)
		if err != nil {
			return 1, namePaths(err, f.positional[0])
		}
		if *output == "json" {
			return 0, in.WriteJSON(stdout)
		}
		return 0, in.WriteHuman(stdout)
	})
}

func imgCheck(args []string, stdout, stderr io.Writer) int {
	f := newImgFlags("check")
	f.allowForceShare()
	format := formatFlag(f.fs)
	output := cli.OutputFlag(f.fs)
	repair := f.fs.String("repair", "", "")
	f.fs.StringVar(repair, "r", "", "")
	return imgRun("check", args, stdout, stderr, f, []string{"FILE"}, func(ctx context.Context, l *imgtool.Launcher) (int, error) {
		if err := requireFormat(*format); err != nil {
			return 1, err
		}
		if err := cli.CheckOutput(*output); err != nil {
			return 1, err
		}
		mode := imgtool.RepairNone
		if *repair != "" {
			var err error
			if mode, err = imgtool.ParseRepair(*repair); err != nil {
				return 1, err
			}
		}
		res, err := l.Check(ctx, f.positional[0], *format, mode)
		if err != nil {
			return 1, namePaths(err, f.positional[0])
		}
		switch {
		case !res.Supported:
			// As qemu-img: a line on stderr, nothing on stdout (which
			// --output json keeps for JSON), status 63.
			var b strings.Builder
			res.WriteHuman(&b)
			fmt.Fprintf(stderr, "krun-core img check: %s\n", strings.TrimSpace(b.String()))
		case *output == "json":
			err = errors.Join(res.WriteMessages(stderr), res.WriteJSON(stdout))
		default:
			// The findings on stderr, the summary on stdout, as qemu-img
			// (helper-125: img wrote both on stdout, and no findings with
			// --output json).
			err = errors.Join(res.WriteMessages(stderr), res.WriteHuman(stdout))
		}
		return res.ExitCode(), err
	})
}

func imgVerify(args []string, stdout, stderr io.Writer) int {
	f := newImgFlags("verify")
	f.allowForceShare()
	format := formatFlag(f.fs)
	noBacking := f.fs.Bool("no-backing", false, "")
	backingDir := f.fs.String("backing-dir", "", "")
	var maxSize sizeFlag
	f.fs.Var(&maxSize, "max-size", "")
	// The gate's policy: a second value is refused, not taken.
	cli.Once(f.fs, "f", "format")
	cli.Once(f.fs, "max-size")
	cli.Once(f.fs, "backing-dir")
	return imgRun("verify", args, stdout, stderr, f, []string{"FILE"}, func(ctx context.Context, l *imgtool.Launcher) (int, error) {
		if err := requireFormat(*format); err != nil {
			return 1, err
		}
		path := f.positional[0]
		v, err := l.Verify(ctx, path, *format, imgtool.Policy{NoBacking: *noBacking, BackingDir: *backingDir, MaxSize: maxSize.n})
		if err != nil {
			return 1, err
		}
		if v.Violation != "" {
			return 1, fmt.Errorf("%s: %s", path, v.Violation)
		}
		fmt.Fprintf(stdout, "%s: valid %s image, virtual size %d\n", path, v.Info.Format, v.Info.VirtualSize)
		return 0, nil
	})
}

func imgCreate(args []string, stdout, stderr io.Writer) int {
	f := newImgFlags("create")
	format := formatFlag(f.fs)
	var size, cluster sizeFlag
	f.fs.Var(&size, "size", "")
	f.fs.Var(&cluster, "cluster-size", "")
	backing := f.fs.String("backing", "", "")
	f.fs.StringVar(backing, "b", "", "")
	backingFormat := f.fs.String("backing-format", "", "")
	f.fs.StringVar(backingFormat, "F", "", "")
	compression := f.fs.String("compression", "", "")
	return imgRun("create", args, stdout, stderr, f, []string{"FILE", "[SIZE]"}, func(ctx context.Context, l *imgtool.Launcher) (int, error) {
		if err := requireFormat(*format); err != nil {
			return 1, err
		}
		if len(f.positional) == 2 { // qemu-img create FILE SIZE
			if size.n != 0 {
				return 1, errors.New("the size is given twice (--size and SIZE after FILE)")
			}
			n, err := devspec.ParseSize(f.positional[1])
			if err != nil {
				return 1, fmt.Errorf("SIZE: %w", err) // ParseSize names the value
			}
			size.n = n
		}
		if *backing != "" && *backingFormat == "" {
			return 1, errors.New("--backing needs --backing-format (formats are never guessed)")
		}
		path := f.positional[0]
		vs, err := l.Create(ctx, path, imgtool.CreateOptions{Format: *format, Size: size.n, ClusterSize: cluster.n,
			CompressionType: *compression, Backing: *backing, BackingFormat: *backingFormat})
		if err != nil {
			return 1, namePaths(err, path)
		}
		fmt.Fprintf(stdout, "created %s: %s, virtual size %d\n", path, *format, vs)
		return 0, nil
	})
}

// backingFlags collects repeated --backing/--backing-format pairs in order.
type backingFlags struct {
	chain []imgtool.Backing
}

func (b *backingFlags) register(fs *flag.FlagSet) {
	addBacking := func(v string) error {
		if v == "" {
			return errors.New("an empty value") // the flag package names the flag
		}
		if n := len(b.chain); n > 0 && b.chain[n-1].Format == "" {
			return fmt.Errorf("--backing %s needs --backing-format before the next --backing", b.chain[n-1].Path)
		}
		if len(b.chain) == devopts.MaxBackingChain {
			return fmt.Errorf("more than %d backing files", devopts.MaxBackingChain)
		}
		b.chain = append(b.chain, imgtool.Backing{Path: v})
		return nil
	}
	fs.Func("backing", "", addBacking)
	fs.Func("b", "", addBacking)
	setFormat := func(v string) error {
		if v == "" {
			return errors.New("an empty value")
		}
		n := len(b.chain)
		if n == 0 || b.chain[n-1].Format != "" {
			return fmt.Errorf("--backing-format %s must follow its --backing", v)
		}
		b.chain[n-1].Format = v
		return nil
	}
	fs.Func("backing-format", "", setFormat)
	fs.Func("F", "", setFormat)
}

// namePaths makes the img plugin's error name the file(s) it is about
// (IN -> OUT for a conversion) unless it names one of them already: the
// plugin that reads the image only holds descriptors, so its errors say
// "invalid qcow2 image: ..." or "write output: ...". krun-core's own
// errors (usage, a missing backing file) are left as they are; the error
// stays what it was for errors.Is.
func namePaths(err error, paths ...string) error {
	var oe *imgtool.OpError
	if !errors.As(err, &oe) {
		return err
	}
	msg := err.Error()
	for _, p := range paths {
		if strings.Contains(msg, p) {
			return err
		}
	}
	return fmt.Errorf("%s: %w", strings.Join(paths, " -> "), err)
}

func (b *backingFlags) check() error {
	for i, bk := range b.chain {
		if bk.Format == "" {
			return fmt.Errorf("--backing %s needs --backing-format (formats are never guessed)", bk.Path)
		}
		if bk.Format == "raw" && i != len(b.chain)-1 {
			return fmt.Errorf("--backing %s is raw, which has no backing file, but more backing files follow", bk.Path)
		}
	}
	return nil
}

// progressFor returns the progress function of --progress: a bar when
// stderr is a terminal, nothing otherwise.
func progressFor(on bool, stderr io.Writer) (imgtool.Progress, func()) {
	if !on || !imgtool.IsTerminal(stderr) {
		return nil, func() {}
	}
	b := imgtool.NewBar(stderr)
	return b.Update, b.Done
}

func imgConvert(args []string, stdout, stderr io.Writer) int {
	f := newImgFlags("convert")
	f.allowForceShare()
	format := formatFlag(f.fs)
	outFormat := f.fs.String("O", "", "")
	var chain backingFlags
	chain.register(f.fs)
	dataFile := f.fs.String("data-file", "", "")
	compress := f.fs.Bool("compress", false, "")
	f.fs.BoolVar(compress, "c", false, "")
	compression := f.fs.String("compression", "", "")
	var cluster sizeFlag
	f.fs.Var(&cluster, "cluster-size", "")
	progress := f.fs.Bool("progress", false, "")
	f.fs.BoolVar(progress, "p", false, "")
	return imgRun("convert", args, stdout, stderr, f, []string{"IN", "OUT"}, func(ctx context.Context, l *imgtool.Launcher) (int, error) {
		if err := requireFormat(*format); err != nil {
			return 1, err
		}
		if *outFormat == "" {
			return 1, errors.New("-O OUTFMT is required")
		}
		if err := chain.check(); err != nil {
			return 1, err
		}
		pf, done := progressFor(*progress, stderr)
		defer done()
		_, err := l.Convert(ctx, imgtool.ConvertOptions{
			Input: f.positional[0], Format: *format, Backing: chain.chain, DataFile: *dataFile,
			Output: f.positional[1], OutputFormat: *outFormat,
			Compress: *compress, ClusterSize: cluster.n, CompressionType: *compression,
		}, pf)
		if err != nil {
			return 1, namePaths(err, f.positional[0], f.positional[1])
		}
		return 0, nil
	})
}

func imgImport(args []string, stdout, stderr io.Writer) int {
	f := newImgFlags("import")
	from := f.fs.String("from-format", "raw", "")
	format := formatFlag(f.fs)
	var maxSize, cluster sizeFlag
	f.fs.Var(&maxSize, "max-size", "")
	f.fs.Var(&cluster, "cluster-size", "")
	compress := f.fs.Bool("compress", false, "")
	f.fs.BoolVar(compress, "c", false, "")
	compression := f.fs.String("compression", "", "")
	progress := f.fs.Bool("progress", false, "")
	f.fs.BoolVar(progress, "p", false, "")
	// The gate's policy: a second value is refused, not taken.
	cli.Once(f.fs, "from-format")
	cli.Once(f.fs, "f", "format")
	cli.Once(f.fs, "max-size")
	return imgRun("import", args, stdout, stderr, f, []string{"OUT"}, func(ctx context.Context, l *imgtool.Launcher) (int, error) {
		if err := requireFormat(*format); err != nil {
			return 1, err
		}
		if maxSize.n == 0 {
			return 1, errors.New("--max-size is required: the size cap holds while the content streams in")
		}
		if imgtool.IsTerminal(os.Stdin) {
			return 1, errors.New("img import reads the image content from stdin, which is a terminal")
		}
		pf, done := progressFor(*progress, stderr)
		defer done()
		_, err := l.Import(ctx, imgtool.ImportOptions{
			Input: os.Stdin, InputFormat: *from, Output: f.positional[0], OutputFormat: *format,
			MaxSize: maxSize.n, Compress: *compress, ClusterSize: cluster.n, CompressionType: *compression,
		}, pf)
		if err != nil {
			return 1, namePaths(err, f.positional[0])
		}
		return 0, nil
	})
}

func imgProbe(args []string, stdout, stderr io.Writer) int {
	f := newImgFlags("probe")
	f.allowForceShare()
	return imgRun("probe", args, stdout, stderr, f, []string{"FILE"}, func(ctx context.Context, l *imgtool.Launcher) (int, error) {
		path := f.positional[0]
		r, err := l.Probe(ctx, path)
		if err != nil {
			return 1, err
		}
		fmt.Fprintln(stdout, r.Format)
		if r.Supported {
			fmt.Fprintf(stderr, "krun-core img probe: warning: %s looks like %s (%s). This is a guess from bytes the file's author controls: "+
				"record it now and pass --format %s explicitly from then on; no other command guesses.\n", path, r.Format, r.Detail, r.Format)
		} else {
			// The plugin's detail already says that krun-core serves
			// raw and qcow2 only.
			fmt.Fprintf(stderr, "krun-core img probe: warning: %s looks like %s (%s).\n", path, r.Format, r.Detail)
		}
		return 0, nil
	})
}

func imgResize(args []string, stdout, stderr io.Writer) int {
	f := newImgFlags("resize")
	format := formatFlag(f.fs)
	shrink := f.fs.Bool("shrink", false, "")
	var chain backingFlags
	chain.register(f.fs)
	return imgRun("resize", sizeLast(args), stdout, stderr, f, []string{"FILE", "SIZE"}, func(ctx context.Context, l *imgtool.Launcher) (int, error) {
		if err := requireFormat(*format); err != nil {
			return 1, err
		}
		if err := chain.check(); err != nil {
			return 1, err
		}
		o := imgtool.ResizeOptions{Format: *format, Shrink: *shrink, Backing: chain.chain}
		arg := f.positional[1]
		num, sign := arg, int64(1)
		switch {
		case strings.HasPrefix(arg, "+"):
			num, o.Relative = arg[1:], true
		case strings.HasPrefix(arg, "-"):
			num, o.Relative, sign = arg[1:], true, -1
		}
		var n int64
		var err error
		if !o.Relative || num == "" || strings.Trim(num, "0") != "" { // +0: no change, as with qemu-img
			if n, err = devspec.ParseSize(num); err != nil {
				if arg == num {
					return 1, fmt.Errorf("SIZE: %w", err) // ParseSize names the value
				}
				return 1, fmt.Errorf("SIZE %q: %w", arg, err) // and the sign
			}
		}
		o.Size = sign * n
		if _, err := l.Resize(ctx, f.positional[0], o); err != nil {
			return 1, namePaths(err, f.positional[0])
		}
		fmt.Fprintln(stdout, "Image resized.")
		return 0, nil
	})
}

// sizeLast lets a negative size end resize's arguments, as qemu-img
// resize takes its last argument as the size before it parses options:
// "-1G" would otherwise be an unknown flag. It is put after a "--" unless
// the arguments already have one.
func sizeLast(args []string) []string {
	n := len(args)
	if n < 2 || len(args[n-1]) < 2 || args[n-1][0] != '-' || args[n-1][1] < '0' || args[n-1][1] > '9' {
		return args
	}
	for _, a := range args[:n-1] {
		if a == "--" {
			return args
		}
	}
	return append(append(args[:n-1:n-1], "--"), args[n-1])
}
