#!/bin/sh
# Installs BuildGrid (the REAPI server the remote tests start) into its own
# Python 3.13 venv: BuildGrid 0.9 needs Python >= 3.13, fastmat's dev venv may
# be older. Idempotent: does nothing when the venv already has a working bgd.
#   FASTMAT_BUILDGRID_VENV   venv location (default ~/.cache/fastmat-buildgrid-venv)
#   FASTMAT_BUILDGRID_SPEC   pip requirement (default buildgrid==0.9.1)
#   PYTHON313                interpreter to use (default: python3.13 on PATH, else pyenv's)
set -eu

venv="${FASTMAT_BUILDGRID_VENV:-$HOME/.cache/fastmat-buildgrid-venv}"
spec="${FASTMAT_BUILDGRID_SPEC:-buildgrid==0.9.1}"

if [ -x "$venv/bin/bgd" ] && "$venv/bin/bgd" --help >/dev/null 2>&1; then
    echo "buildgrid: already installed in $venv"
    exit 0
fi

py="${PYTHON313:-}"
if [ -z "$py" ]; then
    for cand in "$(command -v python3.13 2>/dev/null || true)" \
        /root/.pyenv/versions/3.13.0/bin/python3.13 \
        "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
        if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c 'import sys; assert sys.version_info >= (3, 13)' 2>/dev/null; then
            py="$cand"
            break
        fi
    done
fi
if [ -z "$py" ]; then
    echo "buildgrid: no Python >= 3.13 interpreter found (set PYTHON313)" >&2
    exit 1
fi

echo "buildgrid: creating $venv with $py"
# A venv cannot be moved (its scripts name their interpreter by absolute
# path), so it is built in place and removed again if anything fails.
rm -rf "$venv"
trap 'rm -rf "$venv"' EXIT
"$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "$spec"
"$venv/bin/bgd" --help >/dev/null
trap - EXIT
echo "buildgrid: installed $("$venv/bin/pip" show buildgrid | sed -n 's/^Version: //p') in $venv"
