# syntax=docker/dockerfile:1
# RunPod serverless worker: text embeddings and reranking on Infinity.
#
# GPU (default): docker build -t embedding-worker .
# CPU:           docker build -t embedding-worker:cpu \
#                  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Baked models:  --build-arg MODEL_NAMES="BAAI/bge-small-en-v1.5;BAAI/bge-reranker-base"
#                (gated models: --secret id=hf_token,src=<file holding the token>)
#
# One Dockerfile for both builds: they differ only in where torch comes from. The base is plain
# Debian 12 because its own python3 is 3.11, the version builder/requirements.txt is resolved and
# tested for (nvidia/cuda's Ubuntu bases ship 3.10 or 3.12, and a PPA is one more thing to fetch).
# A GPU needs no CUDA base: PyPI's torch 2.13.0 brings CUDA 13.0 in its nvidia-* wheels, and the
# NVIDIA container runtime mounts the driver when NVIDIA_VISIBLE_DEVICES asks for it (the host's
# driver must support CUDA 13.0: .runpod/hub.json's allowedCudaVersions).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# PyPI's torch is the CUDA build; https://download.pytorch.org/whl/cpu has the CPU build.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG MODEL_NAMES=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    INFINITY_ANONYMOUS_USAGE_STATS=0 \
    DO_NOT_TRACK=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The distribution's python3, checked against the pins; the worker runs as an unprivileged user
# whose home holds the Hugging Face cache (downloads, when a model is neither baked nor cached).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -c 'import sys; v = sys.version_info[:2]; assert v == (3, 11), \
        f"python3 is {v}: builder/requirements.txt is pinned for 3.11 (use a Debian 12 base)"' \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin worker

WORKDIR /app

# torch first, from the index of the wanted build: with torch not yet installed, the requirements
# would pull the newest torch and its CUDA packages instead. Its own layer, the largest, changes
# least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

COPY builder/requirements.txt builder/requirements.txt
RUN pip install -r builder/requirements.txt

# BACKEND=optimum (ONNX Runtime) and BACKEND=ctranslate2, the pyproject extras `onnx` (or
# `onnx-gpu`) and `ctranslate2`. ONNX Runtime's build follows torch's: its CUDA build where torch
# has CUDA (builder/onnx_lock.py), so a GPU image computes with ONNX Runtime's CUDA provider.
COPY builder/onnx_lock.py builder/requirements-onnx.txt builder/requirements-onnx-gpu.txt \
     builder/requirements-ctranslate2.txt builder/
RUN pip install -r "$(python builder/onnx_lock.py)" -r builder/requirements-ctranslate2.txt

# The package itself (its dependencies are the lock above).
COPY pyproject.toml README.md ./
COPY src src
RUN pip install --no-deps . && rm -rf build src

# Models named at build time are written to /models/<org>/<name>, where the worker looks first.
# A token for gated models comes as a build secret, a file that is never part of a layer.
COPY builder/bake_models.py builder/bake_models.py
RUN --mount=type=secret,id=hf_token \
    HF_TOKEN_PATH=/run/secrets/hf_token python builder/bake_models.py --models "${MODEL_NAMES}" --dest /models

COPY handler.py test_input.json ./

# The worker user (uid 1000, made above), numeric so that a runtime refusing root can check it; its
# home holds Infinity's cache too (by default that is the working directory, /app, read-only to it).
ENV MODEL_NAMES=${MODEL_NAMES} \
    MODELS_DIR=/models \
    INFINITY_HOME=/home/worker/.cache/infinity

USER 1000:1000

CMD ["python", "-u", "handler.py"]
