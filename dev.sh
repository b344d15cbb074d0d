#!/usr/bin/env bash
# Set up (once) and run vaegen on a fresh machine:
#   ./dev.sh pipeline [flags]   the main job: ingest Fashion-MNIST, train, generate, into ./vaegen-data
#   ./dev.sh test [pytest args] the test suite (what CI runs): two pytest processes, each test file in one of them
#   ./dev.sh unit [pytest args] the unit tier: no Ray, no S3 server, nothing slow (one pytest process per core)
#   ./dev.sh vaegen VERB ...    any vaegen command inside the project's environment
# It installs what is missing: the Debian package dataset-fashion-mnist and a venv (.venv) with the pins.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
VENV=${VAEGEN_VENV:-.venv}
FASHION_MNIST=/usr/share/datasets/fashion-mnist

ensure_dataset() {
    [ -f "$FASHION_MNIST/train-images-idx3-ubyte.gz" ] && return
    echo "dev.sh: installing the Debian package dataset-fashion-mnist" >&2
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
}

ensure_chromium() {   # tests/show/test_gallery.py renders gallery.html in headless Chromium
    [ -x /usr/bin/chromium ] && return
    echo "dev.sh: installing the Debian package chromium (for the gallery tests)" >&2
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null
}

ensure_venv() {
    local stamp="$VENV/.vaegen-installed" want
    want=$(sha256sum pyproject.toml | cut -c1-16)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
    echo "dev.sh: installing vaegen and its pinned dependencies into $VENV (about 2 minutes)" >&2
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # pip's "Location ... is ignored" notes come from this machine's local wheel mirrors: noise, not errors.
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q -e ".[test]" 2>&1 | grep -v -e "^WARNING: Location" -e "^\s*$" || true
    "$VENV/bin/python" -c "import vae_core, cluster, jobs, torch, ray, moto" || { echo "dev.sh: install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
}

# Python keeps each module's bytecode beside it (__pycache__, ignored by git) unless PYTHONDONTWRITEBYTECODE is set.
# A machine that sets it makes every process compile vaegen's modules again and pytest rewrite every test file
# again: every test, vaegen process and Ray worker. The installed packages' bytecode was written by pip either way.
unset PYTHONDONTWRITEBYTECODE

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    pipeline) ensure_dataset; ensure_venv; exec "$VENV/bin/vaegen" pipeline "$@" ;;
    # Two processes, each with its own local Ray: more would starve the Ray tests of CPUs. A file runs whole in one
    # process (loadfile), so a setup its tests share (a module fixture: jobs made on Ray, the adversarial table)
    # is built once.
    test)     ensure_dataset; ensure_chromium; ensure_venv; exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@" ;;
    unit)     ensure_dataset; ensure_venv; exec "$VENV/bin/python" -m pytest -n auto -m "not ray and not s3 and not slow" "$@" ;;
    vaegen)   ensure_dataset; ensure_venv; exec "$VENV/bin/vaegen" "$@" ;;
    *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
