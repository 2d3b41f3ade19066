package cli

import "testing"

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
