#!/usr/bin/env bash
# The collection's quality gates, offline: ansible-lint --profile production on the tree, then
# `ansible-test sanity` on a copy of it. Run from anywhere; idempotent; `make test` calls it.
#
#   scripts/ansible_checks.sh                   # both
#   scripts/ansible_checks.sh lint              # ansible-lint only
#   scripts/ansible_checks.sh sanity [ARGS...]  # ansible-test sanity only (ARGS go to ansible-test, e.g. --test pep8)
#
# ansible-test insists on running from a directory whose real path ends in
# ansible_collections/<namespace>/<name>, inside git, with tests/output/ ignored. The checkout's own
# path does not end so (collections/ holds only a symbolic link to it, and ansible-test resolves
# links), so the collection as `ansible-galaxy collection build` makes it (what Galaxy and
# certification check) is unpacked into a work directory of that shape that is its own git repository.
#
# ansible-test --requirements bootstraps pip in each sanity virtual environment with a script it
# downloads from a host that cannot be reached here; it uses a cached copy when there is one, so a
# stand-in is written there that installs pip from the package index pip is configured with.
#
# Environment: VENV (default <repo>/.venv), ANSIBLE_CHECKS_WORK (default ~/.cache/confidential_ml.nitro/ansible-checks).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
VENV=${VENV:-$ROOT/.venv}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
BIN=$VENV/bin
PYTHON_VERSION=3.11
NAMESPACE=confidential_ml
NAME=nitro
WORK=${ANSIBLE_CHECKS_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/$NAMESPACE.$NAME/ansible-checks}
COPY=$WORK/ansible_collections/$NAMESPACE/$NAME
GET_PIP=$HOME/.ansible/test/cache/get_pip_24_2.py

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'ansible_checks.sh: %s\n' "$*" >&2; exit 1; }

for tool in ansible-lint ansible-test; do
    [ -x "$BIN/$tool" ] || die "$BIN/$tool is missing: install the test extra first (make venv, or $BIN/pip install '.[test]')"
done
command -v git >/dev/null || die "git is missing: apt-get install git"
export PATH="$BIN:$PATH"
export ANSIBLE_COLLECTIONS_PATH=$ROOT/collections
# Neither tool may reach for Galaxy or the network for metadata.
export ANSIBLE_LINT_SKIP_SCHEMA_UPDATE=1 ANSIBLE_LINT_NODEPS=0 ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 PY_COLORS=0

link_collection() {
    # The same link the Makefile and tests/conftest.py make, for ansible-lint's collection lookups; one that is
    # there is left alone (ln -sfn would remove it for a moment, under tests that may be importing through it).
    local link=$ROOT/collections/ansible_collections/$NAMESPACE/$NAME
    [ "$(readlink "$link")" = "$ROOT" ] && return
    mkdir -p "$(dirname "$link")"
    ln -sfn "$ROOT" "$link"
}

run_lint() {
    link_collection
    say "ansible-lint --profile production ($ROOT)"
    # A private TMPDIR: ansible-lint's syntax check writes a temporary playbook there and would load any
    # collections/ tree lying beside it (a stray /tmp/collections once shadowed this one).
    local tmp
    tmp=$(mktemp -d)
    (cd "$ROOT" && TMPDIR=$tmp ansible-lint --profile production --offline --nocolor) || { rm -rf "$tmp"; return 1; }
    rm -rf "$tmp"
}

write_get_pip_stand_in() {
    local marker="confidential_ml.nitro get-pip stand-in v2"
    if [ -f "$GET_PIP" ] && grep -q "$marker" "$GET_PIP"; then
        return
    fi
    [ -f "$GET_PIP" ] && ! grep -q "confidential_ml.nitro get-pip stand-in" "$GET_PIP" \
        && say "keeping the existing $GET_PIP (not ours; ansible-test will use it)" && return
    mkdir -p "$(dirname "$GET_PIP")"
    cat >"$GET_PIP.tmp" <<EOF
# $marker (written by scripts/ansible_checks.sh).
# ansible-test runs get-pip.py in each new, empty sanity virtual environment as:
#   python get_pip_24_2.py --disable-pip-version-check pip==24.2 [--no-setuptools] [--no-wheel]
# The requested packages are installed with uv when it is on PATH (the venv's bin/, which make venv installs): on a
# fresh machine that took a fraction of a second per environment against 6 s for ensurepip and a pip upgrade, and
# ansible-test makes nine. Without uv, or when uv cannot install them (its index unreachable where pip's is a local
# mirror): bootstrap pip with ensurepip, then let that pip install the requested versions from the index pip is
# configured with.
# ansible-test runs this with only PATH, HOME and the locale from the environment, so uv is told to trust the
# system's certificate store (--native-tls), where SSL_CERT_FILE would otherwise have pointed it.
import os
import shutil
import subprocess
import sys

packages = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
uv = shutil.which("uv")
if uv:
    command = [uv, "pip", "install", "--quiet", "--native-tls", "--python", sys.executable, *packages]
    if subprocess.run(command).returncode == 0:
        sys.exit(0)
    print("get-pip stand-in: uv could not install " + " ".join(packages) + "; trying ensurepip and pip", file=sys.stderr)
subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"], check=True, stdout=subprocess.DEVNULL)
# ensurepip points PIP_CONFIG_FILE at /dev/null while it runs, which would hide this machine's index settings.
env = {key: value for key, value in os.environ.items() if key != "PIP_CONFIG_FILE"}
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", *args], env=env).returncode)
EOF
    mv "$GET_PIP.tmp" "$GET_PIP"
}

mirror_tree() {
    # What the built collection ships (ansible-galaxy collection build: galaxy.yml's build_ignore), which is what
    # Galaxy and certification run ansible-test sanity on, and tests/sanity/ (ansible-test's ignore file, which the
    # tarball leaves out with the rest of tests/). The pytest suite and the benchmarks are not in the tarball: ruff
    # checks them (make test).
    mkdir -p "$COPY"
    if [ ! -d "$COPY/.git" ]; then
        git -C "$COPY" init -q
    fi
    find "$COPY" -mindepth 1 -maxdepth 1 ! -name .git ! -name tests -exec rm -rf {} +
    if [ -d "$COPY/tests" ]; then
        find "$COPY/tests" -mindepth 1 -maxdepth 1 ! -name output -exec rm -rf {} +
    fi
    local dist
    dist=$(mktemp -d)
    ansible-galaxy collection build "$ROOT" --output-path "$dist" >/dev/null || { rm -rf "$dist"; return 1; }
    tar -xzf "$dist"/"$NAMESPACE-$NAME"-*.tar.gz -C "$COPY"
    rm -rf "$dist"
    mkdir -p "$COPY/tests"
    cp -r "$ROOT/tests/sanity" "$COPY/tests/"
    # ansible-test must not check its own work area.
    printf 'tests/output/\n' >"$COPY/.gitignore"
}

install_shellcheck() {
    # Without shellcheck, ansible-test skips its shellcheck test with a warning: results would depend on the machine.
    command -v shellcheck >/dev/null && return
    local as_root=()  # root itself, or sudo when it needs no password
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then as_root=(sudo -n); else as_root=(false); fi
    fi
    if [ "${as_root[*]}" != false ] && command -v apt-get >/dev/null; then
        say "installing shellcheck (Debian package)"
        "${as_root[@]}" apt-get update -qq
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
    else
        say "warning: shellcheck is missing (sudo apt-get install shellcheck); ansible-test will skip that test"
    fi
}

run_sanity() {
    install_shellcheck
    write_get_pip_stand_in
    mirror_tree
    say "ansible-test sanity --python $PYTHON_VERSION ($COPY)"
    # The copy alone is the collection under test: nothing may import the checkout instead (the Makefile
    # exports PYTHONPATH and ANSIBLE_COLLECTIONS_PATH pointing at it).
    (cd "$COPY" && env -u PYTHONPATH -u ANSIBLE_COLLECTIONS_PATH \
        ansible-test sanity --python "$PYTHON_VERSION" --requirements --color no "$@")
}

started=$(date +%s)
case ${1:-all} in
    lint) run_lint ;;
    sanity) shift; run_sanity "$@" ;;
    all) run_lint; run_sanity ;;
    *) die "unknown command ${1}; use lint, sanity [ansible-test args] or nothing for both" ;;
esac
say "ansible checks passed in $(($(date +%s) - started)) s"
