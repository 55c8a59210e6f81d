#!/bin/sh
# make lint: ruff and mypy on the Python, shellcheck (warnings and errors) on every shell file - the stage helpers,
# the OpenRC services, the CI and setup scripts, and the rendered templates that are shell (the initrd's /init,
# the layer's make-layer.sh), rendered for the test profile (every output).
set -eu
cd "$(dirname "$0")/.."
VENV=.venv/bin
$VENV/ruff check builder device tests bench
$VENV/mypy
command -v shellcheck >/dev/null || { echo "lint: shellcheck is missing: make setup installs it" >&2; exit 2; }
files=$(git ls-files '*.sh' '*.sh.j2' 'overlay/etc/init.d/*' .ci/run 'stages/*/udhcpc.script' | grep -v '\.j2$')
# shellcheck disable=SC2086  # one file name per word: none has a space
shellcheck -x -S warning $files
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
if ! out=$($VENV/maculaos-sdk build-image --profile test --dry-run "$rendered" 2>&1); then
  echo "$out" >&2
  exit 1
fi
shellcheck -S warning -s sh "$rendered/40-initrd/init" "$rendered/45-layer/make-layer.sh"
echo "lint: ruff, mypy and shellcheck clean"
