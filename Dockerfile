# llamaserve: OpenAI-compatible server for the embedded SmolLM2 (or your own checkpoint).
# CPU torch by default. CUDA:  docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# The default model is baked into /models at build time, so the container starts with no network.
ARG BASE_IMAGE=python:3.11-slim

# ---- builder: a venv with torch, the dependencies, llamaserve and the default model ----
FROM ${BASE_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
# Where torch comes from. Empty: wheels/ (a local CPU wheel, as CI does) and PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# Layers ordered by how rarely they change: torch, then the other dependencies, then our code.
COPY wheels/ /tmp/wheels/
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install --no-cache-dir --find-links /tmp/wheels "torch==${TORCH_VERSION}"
COPY pyproject.toml /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md /src/
COPY model/ /src/model/
COPY app/ /src/app/
RUN pip install --no-cache-dir --no-deps /src
ENV LLAMASERVE_CACHE_DIR=/models
RUN python -m model.fetch

# ---- runtime: the venv and the model, run by an unprivileged numeric user ----
FROM ${BASE_IMAGE}
# A C/C++ compiler, for the CPU the container runs on: Inductor compiles the decode step at start-up and
# model/native.py builds the int8 head's kernel (-march=native, so neither can be built into the image).
# Without one both fall back to slower torch paths (~1.5x slower decode) and the log says why.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin llamaserve
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLAMASERVE_CACHE_DIR=/models \
    LLAMASERVE_HOST=0.0.0.0 \
    LLAMASERVE_PORT=8000
USER 10001:10001
WORKDIR /home/llamaserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LLAMASERVE_PORT', '8000'), timeout=3)"]
CMD ["llamaserve", "serve"]
