"""BACKEND=ctranslate2: the transformer of a BERT-like encoder on CTranslate2 (backends.py runs
the rest).

The model is converted once, from its local weights, into ONNX_CACHE_DIR's folder of converted
models (float32 weights: CTranslate2 quantises at load, to the DTYPES asked). DTYPES=int8 is int8
weights and float32 activations on a CPU, int8 weights with float16 activations on a GPU;
float16 and bfloat16 compute in those types on a GPU. The encoder gives its token vectors; a
cross-encoder's classification head (BERT's pooler and classifier, RoBERTa's classifier) runs
after it in torch, from the model's own weights.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..logs import get_logger
from .base import ModelLoadError
from .compiled import (
    INT8,
    Loaded,
    Runtime,
    cross_encoder_max_length,
    fed_inputs,
    int8_quality,
    run_head,
)
from .devices import CPU, resolve_devices
from .onnx import cache_folder, compute_threads
from .spec import EngineSettings, ModelSpec

log = get_logger(__name__)


def compute_type(dtype: str, on_gpu: bool) -> str:
    """CTranslate2's compute type for DTYPES on the device kind."""
    if dtype == INT8:
        return "int8_float16" if on_gpu else "int8"
    if dtype in ("float16", "bfloat16"):
        return dtype if on_gpu else "float32"
    if dtype == "auto":
        return "float16" if on_gpu else "float32"
    return "float32"


CUBLAS = "libcublas.so.12"  # the cuBLAS CTranslate2 4.x's wheels load when they compute on a GPU


def cublas_wheel_copies() -> list[Path]:
    """CUDA 12's cuBLAS as the nvidia-cublas-cu12 wheel installs it (the `ctranslate2-gpu`
    extra), in every folder Python imports from."""
    found = (Path(entry) / "nvidia" / "cublas" / "lib" / CUBLAS for entry in sys.path if entry)
    return [path for path in found if path.is_file()]


def load_cublas(devices: tuple[str, ...], model: str) -> None:
    """CTranslate2's wheels load CUDA 12's cuBLAS by name at run time, and torch 2.13's CUDA build
    brings CUDA 13's: on a GPU the model could not compute. So it is loaded here, at start and
    before any conversion: from the system's library path, else from the nvidia-cublas-cu12 wheel
    (once loaded, CTranslate2's own load by name finds it); refused, saying what to install, where
    neither has it."""
    gpus = [d for d in devices if d != CPU]
    if not gpus:
        return
    for candidate in [CUBLAS, *map(str, cublas_wheel_copies())]:
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue
    raise ModelLoadError(
        f"model '{model}': BACKEND=ctranslate2 on CUDA device {gpus[0]} needs CUDA 12's cuBLAS "
        f"({CUBLAS}), which CTranslate2's wheels load and torch's CUDA 13 build lacks: install "
        "the ctranslate2-gpu extra (nvidia-cublas-cu12, builder/requirements-ctranslate2-gpu.txt)"
        "; or set DEVICES=cpu, or BACKEND=torch"
    )


class CTranslate2Runtime:
    """One CTranslate2 encoder on its devices (CTranslate2 spreads a batch queue over several
    CUDA devices itself; the worker keeps one runtime per device for its own spreading)."""

    def __init__(self, path: str, device: str, compute: str, head: Any = None) -> None:
        import ctranslate2

        if device == CPU:
            self.encoder = ctranslate2.Encoder(
                path, device="cpu", compute_type=compute, intra_threads=compute_threads()
            )
        else:
            self.encoder = ctranslate2.Encoder(
                path, device="cuda", device_index=int(device), compute_type=compute
            )
        self.on_gpu = device != CPU
        self.head = head  # a cross-encoder's head: token vectors -> logits

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import ctranslate2

        ids = batch["input_ids"].astype(np.int32)
        lengths = batch["attention_mask"].sum(axis=1).astype(np.int32)
        types = batch.get("token_type_ids")
        output = self.encoder.forward_batch(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(ids)),
            ctranslate2.StorageView.from_array(lengths),
            token_type_ids=None if types is None else types.tolist(),
        )
        hidden = output.last_hidden_state
        if self.on_gpu:
            import torch

            tokens = torch.as_tensor(hidden, device="cuda").float().cpu().numpy()
        else:
            tokens = np.asarray(hidden, dtype=np.float32)
        if self.head is None:
            return tokens
        return self.head(tokens)


def _converted(spec: ModelSpec, settings: EngineSettings, role: str) -> str:
    """The model converted to CTranslate2's format (cached, float32 weights)."""
    from ctranslate2.converters import TransformersConverter

    folder = cache_folder(spec, settings, f"ctranslate2-{role}", ())
    if not (folder / "model.bin").is_file():
        log.info("%s: converting to CTranslate2 into %s (once)", spec.served_id, folder)
        converter = TransformersConverter(spec.source, trust_remote_code=settings.trust_remote_code)

        def convert(tmp: Any) -> None:
            converter.convert(str(tmp), force=True)

        _publish_folder(folder, convert)
    return str(folder)


def _publish_folder(folder: Any, write: Any) -> None:
    """Convert into a temporary folder, then move its files in, model.bin last (what marks the
    conversion complete)."""
    import shutil
    import tempfile
    from pathlib import Path

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".partial-") as tmp:
        out = Path(tmp) / "model"
        write(out)
        files = sorted(out.iterdir(), key=lambda p: p.name == "model.bin")
        for path in files:
            shutil.move(str(path), folder / path.name)


def _head(model: Any) -> Any:
    """The classification head of a *ForSequenceClassification, as a function of the encoder's
    token vectors (BERT: pooler then classifier; RoBERTa-like: classifier on the first token)."""
    import torch

    pooler = None
    for name in ("bert", "roberta"):
        base = getattr(model, name, None)
        if base is not None:
            pooler = getattr(base, "pooler", None)
    classifier = model.classifier

    def logits(tokens: np.ndarray) -> np.ndarray:
        hidden = torch.from_numpy(tokens)
        with torch.inference_mode():
            features = pooler(hidden) if pooler is not None else hidden
            return classifier(features).float().numpy()

    return logits


class CTranslate2Backend:
    def load_embedder(self, spec: ModelSpec, settings: EngineSettings, st_model: Any) -> Loaded:
        transformer = st_model[0]
        tokenizer = st_model.tokenizer
        names = fed_inputs(tokenizer, lambda name: name != "token_type_ids" or _types(st_model))
        devices = resolve_devices(settings.devices)
        load_cublas(devices, spec.served_id)
        path = _converted(spec, settings, "embed")
        loaded = Loaded(
            runtimes=[],
            tokenizer=tokenizer,
            max_length=int(st_model.max_seq_length or tokenizer.model_max_length),
            input_names=names,
            lowercase=bool(getattr(transformer, "do_lower_case", False)),
        )
        if spec.dtype == INT8:
            head = list(st_model)[1:]
            loaded.quality = int8_quality(
                CTranslate2Runtime(path, CPU, "float32"),
                CTranslate2Runtime(path, CPU, "int8"),
                loaded,
                lambda tokens, batch: run_head(head, tokens, batch),
            )
        loaded.runtimes = [
            CTranslate2Runtime(path, d, compute_type(spec.dtype, d != CPU)) for d in devices
        ]
        import torch

        transformer.auto_model = torch.nn.Identity()  # the runtime computes it now
        return loaded

    def load_cross_encoder(
        self, spec: ModelSpec, settings: EngineSettings, model: Any, tokenizer: Any
    ) -> Loaded:
        names = fed_inputs(tokenizer, lambda name: True)
        devices = resolve_devices(settings.devices)
        load_cublas(devices, spec.served_id)
        path = _converted(spec, settings, "cross")
        head = _head(model)
        runtimes: list[Runtime] = [
            CTranslate2Runtime(path, d, compute_type(spec.dtype, d != CPU), head) for d in devices
        ]
        return Loaded(
            runtimes=runtimes,
            tokenizer=tokenizer,
            max_length=cross_encoder_max_length(model.config, tokenizer),
            input_names=names,
        )


def _types(st_model: Any) -> bool:
    """Whether the encoder takes token type ids (BERT's embeddings add them)."""
    config = st_model[0].auto_model.config
    return int(getattr(config, "type_vocab_size", 0) or 0) > 1
