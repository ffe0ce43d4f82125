"""BACKEND=optimum: the transformer of a model on ONNX Runtime (backends.py runs the rest).

The model's own ONNX file is used when its folder has one (`onnx/model.onnx` or `model.onnx`, the
layouts optimum and sentence-transformers write). Otherwise the transformer is exported once, from
the local weights and without any network, into ONNX_CACHE_DIR (on the network volume when one is
mounted, so the next cold start loads it): traced with torch's TorchScript exporter, or where that
cannot trace the model (Gemma3's masks), with torch.export. Every export is checked against the
torch model on a traced batch before it is kept. DTYPES=int8 quantises the float32 file with ONNX
Runtime's dynamic int8 quantisation (weights int8 per channel, activations quantised at run time),
also cached; at load the int8 vectors are compared with float32's (compiled.int8_quality). An
embedder whose fully quantised vectors fall below INT8_MIN_COSINE keeps its down-projections (the
feed-forward matmuls fed by the activation function, whose outliers int8 rounds worst) in float32.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..logs import get_logger
from ..model_paths import RUNPOD_VOLUME
from .base import ModelLoadError
from .compiled import (
    INT8,
    Loaded,
    Runtime,
    cross_encoder_max_length,
    example_batch,
    fed_inputs,
    int8_quality,
    run_head,
)
from .devices import CPU, resolve_devices
from .spec import EngineSettings, ModelSpec

log = get_logger(__name__)

# Where exports go when ONNX_CACHE_DIR is not set: the network volume when mounted, so the next
# cold start skips the export; else a folder of the container's.
VOLUME_CACHE = f"{RUNPOD_VOLUME}/onnx-cache"
LOCAL_CACHE = "/tmp/embedding-worker-onnx"
# The largest difference between the export's outputs and torch's on the traced batch, relative
# to the largest torch output, for the export to be kept.
EXPORT_TOLERANCE = 1e-4
OWN_FILES = ("onnx/model.onnx", "model.onnx")
OPSET = 17
# The least min cosine to float32 (compiled.QUALITY_TEXTS) a fully quantised embedder is served
# at; below it the down-projections stay float32 (`MIXED_INT8`).
INT8_MIN_COSINE = 0.99
ALL_INT8 = "every matmul int8"
MIXED_INT8 = "down-projections float32"


def compute_threads() -> int:
    """The threads a runtime computes with on a CPU: torch's (OMP_NUM_THREADS, else one per
    core), as the torch path computes with."""
    import torch

    return max(1, torch.get_num_threads())


def default_cache_dir() -> Path:
    return Path(VOLUME_CACHE if Path(RUNPOD_VOLUME).is_dir() else LOCAL_CACHE)


CUDA_PROVIDER = "CUDAExecutionProvider"


def require_cuda_provider(providers: Sequence[str], device: str, model: str) -> None:
    """ONNX Runtime runs on the CPU, with a warning alone, when the CUDA provider it is asked for
    is not in its build (the `onnxruntime` package) or cannot load (CUDA or cuDNN libraries
    missing): a GPU worker would serve at CPU speed. Refused instead, saying what to install."""
    if CUDA_PROVIDER not in providers:
        raise ModelLoadError(
            f"model '{model}': BACKEND=optimum on CUDA device {device} needs ONNX Runtime's CUDA "
            "provider, which this installation lacks or cannot load: install the onnx-gpu extra "
            "(onnxruntime-gpu, builder/requirements-onnx-gpu.txt) in place of onnxruntime, with "
            "the CUDA 13 and cuDNN 9 libraries torch's CUDA build brings (the GPU image has "
            "both); or set DEVICES=cpu, or BACKEND=torch"
        )


def usable_devices(spec: ModelSpec, settings: EngineSettings) -> tuple[str, ...]:
    """The devices the model's sessions go on, each one ONNX Runtime can compute on here (checked
    before any export is made)."""
    import onnxruntime as ort

    devices = resolve_devices(settings.devices)
    for device in devices:
        if device != CPU:
            require_cuda_provider(ort.get_available_providers(), device, spec.served_id)
    return devices


class OnnxRuntime:
    """One ONNX Runtime session on one device."""

    def __init__(self, path: Path, device: str, output: str, model: str = "") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its threads wait without spinning: on a shared CPU (a serverless vCPU, a busy pod) a
        # spinning pool takes the cores its own peers and the tokenizer need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = compute_threads()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device != CPU:
            providers.insert(0, (CUDA_PROVIDER, {"device_id": int(device)}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        if device != CPU:  # a provider in the build may still fail to load its libraries
            require_cuda_provider(self.session.get_providers(), device, model)
        self.inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = output if output in outputs else outputs[0]
        self.path = path

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: batch[name] for name in self.inputs if name in batch}
        (out,) = self.session.run([self.output], feed)
        return np.asarray(out, dtype=np.float32)


def _traced(model: Any, with_types: bool) -> Any:
    """The transformer as the exporters see it: named id tensors in, its first output out."""
    import torch

    class Traced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if with_types:
                kwargs["token_type_ids"] = token_type_ids
            return self.model(**kwargs, return_dict=False)[0]

    return Traced().eval()


def _fingerprint(spec: ModelSpec, role: str, input_names: Sequence[str]) -> str:
    """What an export depends on: the model's files (names, sizes, times), the role, the inputs
    and the exporting versions."""
    import torch
    import transformers

    digest = hashlib.sha256()
    root = Path(spec.source)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    digest.update(
        f"{role}|{','.join(input_names)}|{torch.__version__}|{transformers.__version__}"
        f"|{OPSET}".encode()
    )
    return digest.hexdigest()[:16]


def cache_folder(
    spec: ModelSpec, settings: EngineSettings, role: str, names: Sequence[str]
) -> Path:
    base = Path(settings.onnx_cache_dir) if settings.onnx_cache_dir else default_cache_dir()
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec.served_id).strip(".-")
    return base / f"{slug or 'model'}-{_fingerprint(spec, role, names)}"


def _export(model: Any, names: Sequence[str], example: dict[str, np.ndarray], out: Path) -> None:
    """Export with the TorchScript exporter, else torch.export; keep only an export whose
    outputs match torch's on `example`."""
    import torch

    traced = _traced(model, "token_type_ids" in names)
    args = tuple(torch.from_numpy(example[name]) for name in names)
    with torch.inference_mode():
        expected = traced(*args).float().numpy()
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    failures = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                if dynamo:
                    rows, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
                    torch.onnx.export(
                        traced,
                        args,
                        str(out),
                        input_names=list(names),
                        output_names=["output"],
                        dynamic_shapes=tuple({0: rows, 1: tokens} for _ in names),
                        dynamo=True,
                        opset_version=18,
                        verbose=False,
                    )
                else:
                    torch.onnx.export(
                        traced,
                        args,
                        str(out),
                        input_names=list(names),
                        output_names=["output"],
                        dynamic_axes={**axes, "output": {0: "batch", 1: "tokens"}},
                        dynamo=False,
                        opset_version=OPSET,
                    )
            traced.eval()  # the exporters restore the wrapper's (training) mode on exit
            got = OnnxRuntime(out, CPU, "output")(example)
            error = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-6))
            if got.shape == expected.shape and error <= EXPORT_TOLERANCE:
                return
            failures.append(
                f"{'torch.export' if dynamo else 'TorchScript'}: differs by {error:.2g}"
            )
        except Exception as exc:  # the other exporter may trace it
            failures.append(f"{'torch.export' if dynamo else 'TorchScript'}: {type(exc).__name__}")
            log.debug("ONNX export failed: %r", exc)
    raise ModelLoadError(f"the model could not be exported to ONNX ({'; '.join(failures)})")


def down_projections(path: Path) -> list[str]:
    """The matmuls of `path` that project to fewer features than they take: the second
    feed-forward matmul of each layer, whose input is the activation function's output."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    names = []
    for node in graph.node:
        weight = next((shapes[i] for i in node.input[1:2] if i in shapes), None)
        if weight is None or len(weight) != 2:
            continue
        transposed = node.op_type == "Gemm" and any(
            a.name == "transB" and a.i == 1 for a in node.attribute
        )
        taken, given = weight[::-1] if transposed else weight
        if node.op_type in ("MatMul", "Gemm") and taken > given:
            names.append(node.name)
    return names


def _quantise(float32: Path, int8: Path, keep_float: Sequence[str] = ()) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    root.addFilter(_quantiser_chatter)
    try:
        quantize_dynamic(
            float32,
            int8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=keep_float,
        )
    finally:
        root.removeFilter(_quantiser_chatter)


def _quantiser_chatter(record: logging.LogRecord) -> bool:
    """The quantiser logs through the root logger, a line per matmul it leaves alone and advice
    that does not apply: kept out of the worker's log, its errors apart."""
    return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname


def onnx_files(
    spec: ModelSpec,
    settings: EngineSettings,
    model: Any,
    role: str,
    names: Sequence[str],
    example: dict[str, np.ndarray],
) -> tuple[Path, Path | None]:
    """The float32 ONNX file (the model's own, else a cached export) and, for DTYPES=int8, its
    quantised copy (cached)."""
    own = next(
        (Path(spec.source) / f for f in OWN_FILES if (Path(spec.source) / f).is_file()), None
    )
    folder = cache_folder(spec, settings, role, names)
    float32 = own or folder / "model.onnx"
    if own is not None:
        log.info("%s: using the model's own ONNX file %s", spec.served_id, own)
    elif not float32.is_file():
        log.info("%s: exporting to ONNX into %s (once)", spec.served_id, folder)
        _publish(folder, "model.onnx", lambda tmp: _export(model, names, example, tmp))
    if spec.dtype != INT8:
        return float32, None
    int8 = folder / "model_int8.onnx"
    if not int8.is_file():
        _publish(folder, "model_int8.onnx", lambda tmp: _quantise(float32, tmp))
    return float32, int8


def mixed_int8_file(float32: Path, folder: Path) -> Path:
    """The int8 copy of `float32` with its down-projections left in float32, cached in `folder`
    (the fully quantised copy's)."""
    mixed = folder / "model_int8_mixed.onnx"
    if not mixed.is_file():
        keep = down_projections(float32)
        _publish(folder, mixed.name, lambda tmp: _quantise(float32, tmp, keep))
    return mixed


def _publish(folder: Path, name: str, write: Any) -> None:
    """Write `name` into `folder` through a temporary file, renamed in place when complete, so a
    worker killed mid-export leaves no half file for the next one to load."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".partial-") as tmp:
        path = Path(tmp) / name
        write(path)
        for extra in Path(tmp).iterdir():  # external-data files an exporter writes beside it
            if extra != path:
                shutil.move(str(extra), folder / extra.name)
        os.replace(path, folder / name)


class OnnxBackend:
    def load_embedder(self, spec: ModelSpec, settings: EngineSettings, st_model: Any) -> Loaded:
        import inspect

        transformer = st_model[0]
        backbone = transformer.auto_model
        tokenizer = st_model.tokenizer
        devices = usable_devices(spec, settings)
        accepted = inspect.signature(backbone.forward).parameters
        names = fed_inputs(tokenizer, lambda name: name in accepted)
        example = example_batch(tokenizer, names)
        float32, int8 = onnx_files(spec, settings, backbone, "embed", names, example)
        loaded = Loaded(
            runtimes=[],
            tokenizer=tokenizer,
            max_length=int(st_model.max_seq_length or tokenizer.model_max_length),
            input_names=names,
            lowercase=bool(getattr(transformer, "do_lower_case", False)),
        )
        if int8 is not None:
            int8 = self._int8_kept(spec, st_model, loaded, float32, int8)
        path = int8 or float32
        loaded.runtimes = [
            OnnxRuntime(path, d, "last_hidden_state", spec.served_id) for d in devices
        ]
        _drop_weights(st_model)
        return loaded

    @staticmethod
    def _int8_kept(
        spec: ModelSpec,
        st_model: Any,
        loaded: Loaded,
        float32: Path,
        int8: Path,
    ) -> Path:
        """The int8 file served, its cosine to float32 recorded in `loaded`: every matmul in
        int8, or, when that falls below INT8_MIN_COSINE, the down-projections in float32."""
        head = list(st_model)[1:]
        reference = OnnxRuntime(float32, CPU, "output")

        def quality(path: Path) -> dict[str, float]:
            return int8_quality(
                reference,
                OnnxRuntime(path, CPU, "output"),
                loaded,
                lambda tokens, batch: run_head(head, tokens, batch),
            )

        loaded.quality, loaded.int8_scheme = quality(int8), ALL_INT8
        if loaded.quality["min"] >= INT8_MIN_COSINE:
            return int8
        mixed = mixed_int8_file(float32, int8.parent)
        mixed_quality = quality(mixed)
        log.info(
            "%s: int8 with every matmul quantised gives a min cosine to float32 of %.4f "
            "(under %.2f); with the down-projections in float32: %.4f",
            spec.served_id,
            loaded.quality["min"],
            INT8_MIN_COSINE,
            mixed_quality["min"],
        )
        loaded.quality, loaded.int8_scheme = mixed_quality, MIXED_INT8
        return mixed

    def load_cross_encoder(
        self, spec: ModelSpec, settings: EngineSettings, model: Any, tokenizer: Any
    ) -> Loaded:
        import inspect

        devices = usable_devices(spec, settings)
        accepted = inspect.signature(model.forward).parameters
        names = fed_inputs(tokenizer, lambda name: name in accepted)
        example = example_batch(tokenizer, names)
        float32, int8 = onnx_files(spec, settings, model, "cross", names, example)
        runtimes: list[Runtime] = [
            OnnxRuntime(int8 or float32, d, "logits", spec.served_id) for d in devices
        ]
        return Loaded(
            runtimes=runtimes,
            tokenizer=tokenizer,
            max_length=cross_encoder_max_length(model.config, tokenizer),
            input_names=names,
        )


def _drop_weights(st_model: Any) -> None:
    """The torch transformer is not needed once the runtime computes it: free its weights (the
    modules after it stay, they run on the runtime's output)."""
    import torch

    transformer = st_model[0]
    transformer.auto_model = torch.nn.Identity()
