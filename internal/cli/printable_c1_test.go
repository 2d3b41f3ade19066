package cli

import (
	"strings"
	"testing"
)

// Printable promises that guest console lines (core/vmm's guest-console
// log) and plugin texts (pluginhost's error lines and re-logged stderr)
// cannot carry an escape sequence to the user's terminal. A raw C1 control
// byte is one: 0x9b is CSI and 0x9d OSC to a terminal in an 8-bit mode (the
// Linux VT without UTF-8, xterm with a Latin-1 locale). As a lone byte it is
// invalid UTF-8, which the rune check decodes to U+FFFD and lets through.
func TestPrintableQuotesRawC1Bytes(t *testing.T) {
	for _, s := range []string{
		"ok\x9b2J",               // 8-bit CSI: erase the screen
		"ok\x9b31mred",           // 8-bit CSI: colour
		"ok\x9d0;title\x9c",      // 8-bit OSC ... ST: set the window title
		"[ERROR] x\x85fake line", // 8-bit NEL
	} {
		got := Printable(s)
		if got == s {
			t.Errorf("Printable(%q) passed the raw C1 byte through unquoted", s)
		}
	}
}

// TestPrintableQuotesInvisibleFormatting: bidirectional overrides and
// isolates, zero-width characters and Unicode's line and paragraph
// separators are quoted (a guest's console line reaches the user's
// terminal); ordinary non-ASCII text is not (from review).
func TestPrintableQuotesInvisibleFormatting(t *testing.T) {
	for _, tc := range []struct {
		in     string
		quoted bool
	}{
		{"\u202eeldnah", true},     // RIGHT-TO-LEFT OVERRIDE
		{"a\u2066b\u2069", true},   // isolates
		{"zero\u200bwidth", true},  // ZERO WIDTH SPACE
		{"soft\u00adhyphen", true}, // Cf too
		{"line\u2028sep", true},    // LINE SEPARATOR
		{"para\u2029sep", true},    // PARAGRAPH SEPARATOR
		{"bom\ufeff", true},        // ZERO WIDTH NO-BREAK SPACE
		{"café über 日本 ✓", false},
		{"tab\tok", false},
	} {
		got := Printable(tc.in)
		if quoted := got != tc.in; quoted != tc.quoted {
			t.Errorf("Printable(%q) = %q: quoted %v, want %v", tc.in, got, quoted, tc.quoted)
		}
		if tc.quoted && strings.ContainsFunc(got, unprintable) {
			t.Errorf("Printable(%q) = %q still holds the character", tc.in, got)
		}
	}
}

// TestOneLineEscapesControls: an error line built from what the user gave
// (a file name with an escape sequence) cannot drive the terminal; line
// breaks still fold into spaces (from review).
func TestOneLineEscapesControls(t *testing.T) {
	tests := []struct{ in, want string }{
		{"plain message", "plain message"},
		{"two\nlines\r\n  indented", "two lines indented"},
		{"command not found: /bin/tr\x1b[31mue", `command not found: /bin/tr\x1b[31mue`},
		{"bell\a and del\x7f", `bell\a and del\x7f`},
		{"bad byte \xff here", `bad byte \xff here`},
		{"bidi \u202e override", `bidi \u202e override`},
		{"ünïcödé stays", "ünïcödé stays"},
	}
	for _, tc := range tests {
		if got := OneLine(tc.in); got != tc.want {
			t.Errorf("OneLine(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
