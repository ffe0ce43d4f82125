"""Which ONNX Runtime lock the image installs: the CUDA build where torch is a CUDA build.

The Dockerfile's one build argument, TORCH_INDEX_URL, picks torch's build; ONNX Runtime follows
what was installed rather than a second argument, so the two cannot disagree.

    python builder/onnx_lock.py   # prints the lock's path, relative to the repository
"""

from __future__ import annotations

CPU_LOCK = "builder/requirements-onnx.txt"
GPU_LOCK = "builder/requirements-onnx-gpu.txt"


def onnx_lock(torch_cuda: str | None) -> str:
    """The lock for a torch whose `torch.version.cuda` is `torch_cuda` (None: a CPU build)."""
    return CPU_LOCK if torch_cuda is None else GPU_LOCK


if __name__ == "__main__":
    import torch

    print(onnx_lock(torch.version.cuda))
