#!/bin/sh
# Runs every fuzz target of the repository in turn (make fuzz), each for
# FUZZTIME (default 30s), one at a time and on one worker unless
# FUZZ_PARALLEL says more: FUZZ='Pattern' picks targets by name (a go
# test -run style regexp), FUZZ_PKGS the packages (default ./...).
# go test's own 10-minute limit would end a longer run, so it is lifted;
# minimizing a new input is bounded, as the fuzz tests ask
# (-fuzzminimizetime). A failing target leaves its input under the
# package's testdata/fuzz/ and ends the run with status 1; the others
# are not run after it.
set -eu
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-30s}
FUZZ_PARALLEL=${FUZZ_PARALLEL:-1}
FUZZ=${FUZZ:-.}
FUZZ_PKGS=${FUZZ_PKGS:-./...}

targets=$($GO test -list '^Fuzz' $FUZZ_PKGS | awk '
	/^Fuzz/ { names = names " " $1; next }
	/^ok/ && names != "" { print $2 ":" names; names = "" }
	/^ok/ { names = "" }')
[ -n "$targets" ] || { echo "fuzz-all: no fuzz targets in $FUZZ_PKGS" >&2; exit 1; }
echo "$targets" | while IFS=: read -r pkg names; do
	for name in $names; do
		echo "$name" | grep -Eq -- "$FUZZ" || continue
		echo "== $pkg $name ($FUZZTIME)"
		$GO test -run XXX -fuzz "^$name\$" -fuzztime "$FUZZTIME" -fuzzminimizetime 20x \
			-parallel "$FUZZ_PARALLEL" -timeout 0 "./${pkg#github.com/krun-core/krun-core/}"
	done
done
