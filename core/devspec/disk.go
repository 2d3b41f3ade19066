package devspec

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/krun-core/krun-core/devopts"
)

// Backing is one declared backing file.
type Backing struct {
	Path   string
	Format devopts.Format
}

// DiskSpec is a parsed --disk option string:
//
//	path=FILE,format=raw|qcow2[,readonly=on][,backing=FILE,backing-format=FMT
//	[,backing=...]][,max-size=64G][,data-file=FILE][,queues=N]
type DiskSpec struct {
	Path     string
	Format   devopts.Format
	ReadOnly bool
	// Backing is the declared chain, nearest first. qcow2 only.
	Backing []Backing
	// MaxSize is the largest virtual size (in bytes) the image may have; an
	// image that declares more is refused at open. 0 means unset. qcow2 only.
	MaxSize int64
	// DataFile is a qcow2 external data file; "" means none.
	DataFile string
	// Queues is how many request queues the device offers,
	// 1..devopts.MaxDiskQueues; 0 means the plugin's default.
	Queues int
}

// ParseDisk parses a --disk option string.
func ParseDisk(s string) (*DiskSpec, error) {
	opts, err := splitOptions(s)
	if err != nil {
		return nil, err
	}
	d := &DiskSpec{}
	seen := map[string]bool{}
	for _, o := range opts {
		if !o.hasValue {
			return nil, fmt.Errorf("%s is not key=value", printable(o.key))
		}
		switch o.key {
		case "path", "format", "readonly", "max-size", "data-file", "queues":
			if seen[o.key] {
				return nil, fmt.Errorf("%s= given twice", o.key)
			}
			seen[o.key] = true
		}
		switch o.key {
		case "path":
			if err := checkPath("path", o.value); err != nil {
				return nil, err
			}
			d.Path = o.value
		case "format":
			f, err := parseFormat(o.value)
			if err != nil {
				return nil, err
			}
			d.Format = f
		case "readonly":
			if d.ReadOnly, err = parseOnOff(o.key, o.value); err != nil {
				return nil, err
			}
		case "backing":
			if err := checkPath("backing", o.value); err != nil {
				return nil, err
			}
			if n := len(d.Backing); n > 0 && d.Backing[n-1].Format == "" {
				return nil, fmt.Errorf("backing=%s needs backing-format= before the next backing=", printable(d.Backing[n-1].Path))
			}
			if len(d.Backing) == devopts.MaxBackingChain {
				return nil, fmt.Errorf("more than %d backing files", devopts.MaxBackingChain)
			}
			d.Backing = append(d.Backing, Backing{Path: o.value})
		case "backing-format":
			n := len(d.Backing)
			if n == 0 || d.Backing[n-1].Format != "" {
				return nil, fmt.Errorf("backing-format=%s must follow its backing=", printable(o.value))
			}
			f, err := parseFormat(o.value)
			if err != nil {
				return nil, fmt.Errorf("backing-format: %w", err)
			}
			d.Backing[n-1].Format = f
		case "max-size":
			if d.MaxSize, err = ParseSize(o.value); err != nil {
				return nil, fmt.Errorf("max-size: %w", err)
			}
		case "data-file":
			if err := checkPath("data-file", o.value); err != nil {
				return nil, err
			}
			d.DataFile = o.value
		case "queues":
			n, ok := devopts.Decimal(o.value)
			if !ok || n < 1 || n > devopts.MaxDiskQueues {
				return nil, fmt.Errorf("queues=%s: want a number of request queues in 1..%d", printable(o.value), devopts.MaxDiskQueues)
			}
			d.Queues = n
		default:
			return nil, fmt.Errorf("unknown key %s (want path, format, readonly, backing, backing-format, max-size, data-file, queues)", printable(o.key))
		}
	}
	if d.Path == "" {
		return nil, fmt.Errorf("path= is required")
	}
	if d.Format == "" {
		_, err := devopts.ParseFormat("")
		return nil, err
	}
	for i, b := range d.Backing {
		if b.Format == "" {
			return nil, fmt.Errorf("backing=%s needs backing-format= (formats are never guessed)", printable(b.Path))
		}
		if b.Format == devopts.Raw && i != len(d.Backing)-1 {
			return nil, fmt.Errorf("backing=%s is raw, which has no backing file, but more backing files follow", printable(b.Path))
		}
	}
	if d.Format == devopts.Raw {
		switch {
		case len(d.Backing) > 0:
			return nil, fmt.Errorf("backing= needs format=qcow2 (a raw image has no backing file)")
		case d.DataFile != "":
			return nil, fmt.Errorf("data-file= needs format=qcow2")
		case d.MaxSize != 0:
			return nil, fmt.Errorf("max-size= needs format=qcow2 (a raw image does not grow)")
		}
	}
	return d, nil
}

// parseFormat is devopts.ParseFormat with the value quoted safely for a
// one-line message.
func parseFormat(v string) (devopts.Format, error) {
	f, err := devopts.ParseFormat(v)
	if err != nil && v != "" {
		return "", fmt.Errorf("unknown format %s (want raw or qcow2)", printable(v))
	}
	return f, err
}

// Kind is blk-raw or blk-qcow2.
func (d *DiskSpec) Kind() string {
	if d.Format == devopts.QCOW2 {
		return devopts.KindBlkQCOW2
	}
	return devopts.KindBlkRaw
}

// String renders d in --disk form.
func (d *DiskSpec) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "path=%s,format=%s", escape(d.Path), d.Format)
	if d.ReadOnly {
		b.WriteString(",readonly=on")
	}
	for _, bk := range d.Backing {
		fmt.Fprintf(&b, ",backing=%s,backing-format=%s", escape(bk.Path), bk.Format)
	}
	if d.MaxSize != 0 {
		fmt.Fprintf(&b, ",max-size=%d", d.MaxSize)
	}
	if d.DataFile != "" {
		fmt.Fprintf(&b, ",data-file=%s", escape(d.DataFile))
	}
	if d.Queues != 0 {
		fmt.Fprintf(&b, ",queues=%d", d.Queues)
	}
	return b.String()
}

// ParseSize parses a byte count with an optional binary suffix: 512, 64K,
// 10M, 64G, 2T, 1P (k/m/g/t/p also accepted, as is a trailing "B" or "iB").
// The result is positive and fits an int64.
func ParseSize(s string) (int64, error) {
	num := strings.TrimSuffix(s, "B")
	if m, ok := strings.CutSuffix(s, "iB"); ok && m != "" && strings.ContainsRune("kKmMgGtTpP", rune(m[len(m)-1])) {
		num = m // KiB, MiB...: "iB" alone is no unit
	}
	shift := uint(0)
	if num != "" {
		switch num[len(num)-1] {
		case 'k', 'K':
			shift = 10
		case 'm', 'M':
			shift = 20
		case 'g', 'G':
			shift = 30
		case 't', 'T':
			shift = 40
		case 'p', 'P':
			shift = 50
		}
		if shift != 0 {
			num = num[:len(num)-1]
		}
	}
	if num == "" || strings.TrimLeft(num, "0123456789") != "" {
		return 0, fmt.Errorf("%s is not a size (want e.g. 64G)", printable(s))
	}
	n, err := strconv.ParseUint(num, 10, 63)
	if err != nil || n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("%s is too large", printable(s))
	}
	if n == 0 {
		return 0, fmt.Errorf("%s must be positive", printable(s))
	}
	return int64(n << shift), nil
}
