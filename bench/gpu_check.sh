#!/usr/bin/env bash
# The GPU check (issue 17 item 4) from a bare machine: install what is missing, run
# `python -m bench.gpu_check`, write OUT_DIR/gpu_check.json (+ gpu_check.log), print the elapsed time.
#
#   bash bench/gpu_check.sh [--dry-run] [OUT_DIR] [--other-gpu_check-flags ...]
#
# OUT_DIR defaults to $OUT (the device tool's folder that comes back), else the current directory.
# Install: wheels in .whl/ (bench/gpu_wheels.sh makes them; the machine has no network) go into
# $GPU_CHECK_SITE (/tmp/site) with pip --no-index --no-deps, put first on PYTHONPATH. The check
# itself needs none of them (torch, numpy, regex, tiktoken, tqdm: in the GPU image); without
# .whl/ and with something missing, pip fetches it from the registry. Exit status: the check's.
set -euo pipefail
start=$SECONDS
here=$(pwd)
cd "$(dirname "$0")/.."

dry=()
extra=()
out_dir=""
for arg in "$@"; do
    case $arg in
        --dry-run) dry=(--dry-run) ;;
        -*) extra+=("$arg") ;;
        *) if [ -z "$out_dir" ]; then out_dir=$arg; else extra+=("$arg"); fi ;;
    esac
done
out_dir=${out_dir:-${OUT:-.}}
case $out_dir in /*) ;; *) out_dir=$here/$out_dir ;; esac
mkdir -p "$out_dir"

PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1

wheels=${GPU_CHECK_WHEELS:-.whl}
site=${GPU_CHECK_SITE:-/tmp/site}
if compgen -G "$wheels/*.whl" >/dev/null; then
    echo "== install: $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl; then
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    else  # e.g. cp312 wheels on another Python: the check needs none of them, the server would
        echo "WARNING: the wheels in $wheels did not install (made for Python 3.12 x86-64); going on without them"
    fi
fi
if ! "$PY" -c "import torch, app.engine, model.llama" 2>/dev/null; then
    echo "== install: from the registry"
    "$PY" -m pip install -q numpy regex tiktoken tqdm
fi
"$PY" -c "import torch, app.engine, model.llama; print('== python', __import__('sys').version.split()[0], 'torch', torch.__version__)"
echo "== install done in $((SECONDS - start)) s"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
fi

set +e
"$PY" -m bench.gpu_check "${dry[@]}" --out "$out_dir/gpu_check.json" "${extra[@]}" 2>&1 | tee "$out_dir/gpu_check.log"
rc=${PIPESTATUS[0]}
set -e
echo "== gpu_check.sh: exit $rc after $((SECONDS - start)) s; $out_dir/gpu_check.json"
exit "$rc"
