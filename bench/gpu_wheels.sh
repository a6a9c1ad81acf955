#!/usr/bin/env bash
# Wheels for the GPU machine (no network there), into .whl/ (git-ignored via .git/info/exclude).
#
#   bash bench/gpu_wheels.sh            # the server's packages its image lacks (below)
#   bash bench/gpu_wheels.sh NAME==VER  # these instead
#
# bench/gpu_check.py itself needs none of them: `import app.engine, model.llama` pulls only torch,
# numpy, regex, tiktoken, tqdm and typing_extensions, all in the image (KINDS.md's package list).
# These are for running the HTTP server or its tests there too; bench/gpu_check.sh installs
# whatever lies in .whl/ (pip --no-index --no-deps --target /tmp/site). Versions are the ones this
# checkout's .venv runs, so the GPU machine runs what CI tests. Python 3.12, x86-64 manylinux.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}

if [ "$#" -gt 0 ]; then
    pkgs=("$@")
else
    pkgs=(
        fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
        pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
        python-dotenv==1.2.4 opentelemetry-api==1.45.3 gguf==0.19.0
    )
fi

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
ls -l .whl
du -sh .whl
