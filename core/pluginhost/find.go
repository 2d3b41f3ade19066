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

// CheckSearchPath checks the plugin directories the user named: the
// --plugin-dir flag (flagDir) and $KRUN_PLUGIN_DIR must each be an existing
// directory when set. A directory that is missing is an error, not a
// directory silently skipped.
func CheckSearchPath(flagDir string) error {
	if flagDir != "" {
		if err := checkDir(flagDir); err != nil {
			return fmt.Errorf("--plugin-dir %s: %w", flagDir, err)
		}
	}
	if d := os.Getenv(EnvPluginDir); d != "" {
		if err := checkDir(d); err != nil {
			return fmt.Errorf("$%s=%s: %w", EnvPluginDir, d, err)
		}
	}
	return nil
}

func checkDir(d string) error {
	st, err := os.Stat(d)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return errors.New("no such directory")
	case err != nil:
		var pe *os.PathError
		if errors.As(err, &pe) {
			return pe.Err
		}
		return err
	case !st.IsDir():
		return errors.New("not a directory")
	}
	return nil
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
		// A relative directory ("." or "bin") must not reach exec as a
		// bare name, which exec would look up in $PATH instead.
		if !filepath.IsAbs(p) {
			abs, err := filepath.Abs(p)
			if err != nil {
				notes = append(notes, fmt.Sprintf("%s: %v", p, err))
				continue
			}
			p = abs
		}
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
	} else if _, err := os.Executable(); err != nil {
		// Without /proc krun-core does not know its own directory (and
		// cannot start a plugin at all: sandbox.CheckProc).
		where = fmt.Sprintf("nowhere (krun-core's own directory is unknown: %v; is /proc mounted?)", err)
	}
	msg := fmt.Sprintf("%s not found in %s; install it next to krun-core, name its directory with --plugin-dir, or set %s", name, where, EnvPluginDir)
	if len(notes) > 0 {
		msg += " (" + strings.Join(notes, "; ") + ")"
	}
	return "", fmt.Errorf("%w: %s", ErrNotFound, msg)
}
