#!/usr/bin/env bash
# One entry point for newcomers and CI:
#   ./run.sh serve [llamaserve flags]   set up, then serve the default model on 127.0.0.1:8000
#   ./run.sh test  [pytest args]        set up, then run the test suite
#   ./run.sh lint                       set up, then ruff (lint + format check) and mypy
#   ./run.sh setup                      only set up: .venv, CPU torch, llamaserve[test], default model
# Set-up is idempotent: a second run only re-checks the model file.
#
# Knobs (environment):
#   PYTHON                  interpreter that creates the venv (default: python3, needs >= 3.11)
#   LLAMASERVE_VENV         where the venv lives (default: .venv)
#   LLAMASERVE_TORCH        pip requirement for torch (default: torch==2.13.0)
#   LLAMASERVE_TORCH_INDEX  index to take torch from (default: PyTorch's CPU index; set it to
#                           https://download.pytorch.org/whl/cu126 for CUDA, or to "" to use pip's
#                           own configuration). A torch already in the venv is always kept.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${LLAMASERVE_VENV:-.venv}"
PY="$VENV/bin/python"
TORCH_REQ="${LLAMASERVE_TORCH:-torch==2.13.0}"
TORCH_INDEX="${LLAMASERVE_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"

log() { printf '==> %s\n' "$*" >&2; }

# True when the URL answers within 5 s; an unreachable index would otherwise cost pip minutes of retries.
reachable() {
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" 2>/dev/null
}

# Install torch before the project so that `torch>=2.5` is already satisfied and pip never picks
# the multi-GB CUDA build from PyPI on its own.
install_torch() {
    if "$PY" -c 'import torch' 2>/dev/null; then
        log "keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
        return
    fi
    local index_args=()
    if [ -n "$TORCH_INDEX" ] && reachable "${TORCH_INDEX%/}/torch/"; then
        index_args=(--index-url "$TORCH_INDEX")
    elif [ -n "$TORCH_INDEX" ]; then
        log "torch index $TORCH_INDEX is unreachable: installing $TORCH_REQ with pip's own configuration"
    fi
    log "installing $TORCH_REQ"
    "$PY" -m pip install ${index_args[@]+"${index_args[@]}"} "$TORCH_REQ"
}

setup() {
    if [ ! -x "$PY" ]; then
        log "creating the virtual environment $VENV"
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "error: $VENV has Python $("$PY" -V 2>&1); llamaserve needs >= 3.11 (set PYTHON=python3.11 and remove $VENV)" >&2
        exit 1
    fi
    local stamp="$VENV/.llamaserve-installed"
    local want
    want="$("$PY" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
        install_torch
        log "installing llamaserve with its test extra (editable)"
        "$PY" -m pip install -e ".[test]"
        echo "$want" >"$stamp"
    fi
    log "fetching the default model if it is missing"
    "$PY" -m model.fetch
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup
        ;;
    serve)
        setup
        export LLAMASERVE_HOST="${LLAMASERVE_HOST:-127.0.0.1}" LLAMASERVE_PORT="${LLAMASERVE_PORT:-8000}"
        log "serving on http://$LLAMASERVE_HOST:$LLAMASERVE_PORT (Ctrl-C stops)"
        exec "$VENV/bin/llamaserve" serve "$@"
        ;;
    test)
        setup
        log "running the test suite"
        exec "$PY" -m pytest "$@"
        ;;
    lint)
        setup
        log "ruff check, ruff format --check, mypy"
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        exec "$VENV/bin/mypy"
        ;;
    *)
        echo "usage: ./run.sh serve [llamaserve flags] | test [pytest args] | lint | setup" >&2
        exit 2
        ;;
esac
