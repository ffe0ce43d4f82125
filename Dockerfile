# syntax=docker/dockerfile:1
# RunPod serverless worker: text embeddings and reranking on Infinity.
#
# GPU (default): docker build -t embedding-worker .
# CPU:           docker build -t embedding-worker:cpu \
#                  --build-arg BASE_IMAGE=ubuntu:22.04 \
#                  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Baked models:  --build-arg MODEL_NAMES="BAAI/bge-small-en-v1.5;BAAI/bge-reranker-base"
#                (gated models: --secret id=hf_token,env=HF_TOKEN)

# torch 2.13.0 from PyPI bundles CUDA 13.0 (driver >= 580); the CUDA base adds the forward-compat
# libraries and the NVIDIA container variables.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04
FROM ${BASE_IMAGE}

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

# Python 3.11 (the version the pinned requirements are resolved for) from the deadsnakes PPA.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /app

# torch first, from the index of the wanted build (CUDA from PyPI, or CPU), then the pinned rest.
COPY builder/requirements.txt builder/requirements.txt
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install -r builder/requirements.txt

# The package itself (its dependencies are the lock above).
COPY pyproject.toml README.md ./
COPY src src
RUN pip install --no-deps .

COPY builder/bake_models.py builder/bake_models.py

# Models named at build time are written to /models/<org>/<name>; the worker finds them there.
RUN --mount=type=secret,id=hf_token,env=HF_TOKEN \
    python builder/bake_models.py --models "${MODEL_NAMES}" --dest /models

COPY handler.py test_input.json ./

ENV MODEL_NAMES=${MODEL_NAMES} \
    MODELS_DIR=/models

CMD ["python", "-u", "handler.py"]
