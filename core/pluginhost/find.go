package pluginhost

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/krun-core/krun-core/proto/pluginpb"
)

// EnvPluginDir names the environment variable holding a plugin directory.
const EnvPluginDir = "KRUN_PLUGIN_DIR"

// ErrNotFound is wrapped by Find's error when no executable exists.
var ErrNotFound = errors.New("plugin not found")

// ExecutableName returns the executable name of a plugin kind:
// krun-plugin-<kind>.
func ExecutableName(kind string) string { return pluginpb.ExecutablePrefix + kind }

// CheckKind validates a plugin kind: 1-64 bytes of [a-z0-9-], starting with
// a letter or digit. Kinds become file names, so nothing else is allowed.
func CheckKind(kind string) error {
	if kind == "" || len(kind) > 64 || kind[0] == '-' {
		return fmt.Errorf("invalid plugin kind %q (want 1-64 characters of a-z, 0-9 and '-')", kind)
	}
	for _, c := range []byte(kind) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("invalid plugin kind %q (want 1-64 characters of a-z, 0-9 and '-')", kind)
		}
	}
	return nil
}

// SearchPath returns the directories searched for plugins, in order:
// flagDir (a --plugin-dir flag) if set, $KRUN_PLUGIN_DIR if set, and the
// directory of the running krun-core executable.
func SearchPath(flagDir string) []string {
	var dirs []string
	if flagDir != "" {
		dirs = append(dirs, flagDir)
	}
	if d := os.Getenv(EnvPluginDir); d != "" {
		dirs = append(dirs, d)
	}
	if exe, err := os.Executable(); err == nil {
		dirs = append(dirs, filepath.Dir(exe))
	}
	return dirs
}

// Find returns the path of krun-plugin-<kind> in the first of dirs that has
// it as an executable regular file.
func Find(kind string, dirs []string) (string, error) {
	if err := CheckKind(kind); err != nil {
		return "", err
	}
	name := ExecutableName(kind)
	var notes []string
	for _, d := range dirs {
		p := filepath.Join(d, name)
		st, err := os.Stat(p)
		switch {
		case err != nil:
			continue
		case !st.Mode().IsRegular():
			notes = append(notes, p+" is not a regular file")
		case st.Mode().Perm()&0o111 == 0:
			notes = append(notes, p+" is not executable")
		default:
			return p, nil
		}
	}
	where := "nowhere (no directories)"
	if len(dirs) > 0 {
		where = strings.Join(dirs, ", ")
	}
	msg := fmt.Sprintf("%s not found in %s; install it next to krun-core or set %s", name, where, EnvPluginDir)
	if len(notes) > 0 {
		msg += " (" + strings.Join(notes, "; ") + ")"
	}
	return "", fmt.Errorf("%w: %s", ErrNotFound, msg)
}
