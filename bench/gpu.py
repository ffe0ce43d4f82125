"""The worker on a GPU: against raw Infinity, sentence-transformers and the other backends, in one
run, on random-initialised models of real shapes (no hub needed).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.gpu [--budget-s 420] [--out bench/RESULTS-gpu.md]
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.gpu --toy     # any machine, tiny sizes (the tests)

Models: the shapes of all-MiniLM-L6-v2, bge-base-en-v1.5, bge-large-en-v1.5 (BERT) and
Qwen3-Embedding-0.6B (last-token pooled Qwen3), in float16 and bfloat16, texts of about 12, 110
and 500 tokens. For each: throughput (inputs/s, requests of 16 inputs, all sent at once), and the
latency of one request of one text (median), for
- the worker (its dispatch, paced queue and Infinity engine),
- the raw Infinity engine built from the same EngineArgs (bench/baseline.py),
- sentence-transformers' `encode` in the same dtype (batch 32),
- the worker on CTranslate2 (float16; BERT shapes only: it runs no Qwen3 encoder) and on ONNX
  Runtime (float32 with CUDA's provider, where onnxruntime-gpu is installed).
Every subject of a row is measured in interleaved rounds, and the ratio columns are paired medians
against the raw engine in the same run. The run keeps to `--budget-s` seconds: it measures the
models in order, fewer rounds as time runs short, and lists what it had to skip. It writes the
table to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    in_requests,
    interleaved,
    log,
    offline,
    paired_ratio,
    random_model,
)
from bench.common import SHAPES as COMMON_SHAPES
from bench.common import texts_of_length as _texts_of_length
from embedding_worker.transports.runpod import answer_job

# The shapes measured: all-MiniLM-L6-v2's, bge-base's, bge-large's, Qwen3-Embedding-0.6B's.
SHAPES = {
    name: COMMON_SHAPES[name] for name in ("minilm-shape", "bge-base", "bge-large", "qwen3-0.6b")
}
TOY_SHAPES: dict[str, dict[str, Any]] = {
    "toy-bert": dict(
        family="bert",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        vocab_size=None,
        max_seq_length=128,
    ),
    "toy-qwen3": dict(
        family="qwen3",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        vocab_size=None,
        max_seq_length=128,
    ),
}
LENGTHS = {"short": 12, "medium": 110, "long": 500}
# Inputs per throughput round on a GPU (toy runs divide them by 32).
COUNTS = {"short": 2048, "medium": 1024, "long": 256}
DTYPES = ("float16", "bfloat16")
BASELINE = "infinity"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--toy", action="store_true", help="tiny models and inputs, any device")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-rounds", type=int, default=30)
    parser.add_argument("--models", default="", help="a subset of the shapes, comma-separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-gpu.md")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "models")
    return parser.parse_args(argv)


class Subject:
    """One thing measured: `embed(texts)` and `stop()`."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def embed(self, texts: list[str]) -> Any:
        raise NotImplementedError

    async def stop(self) -> None:
        pass


class WorkerSubject(Subject):
    def __init__(self, name: str, env: dict[str, str]) -> None:
        super().__init__(name)
        from embedding_worker.config import load_config
        from embedding_worker.dispatch import Worker

        self.worker = Worker.from_config(load_config(env))
        self.model = self.worker.registry.ids[0]

    async def start(self) -> None:
        await self.worker.start()

    async def embed(self, texts: list[str]) -> Any:
        reply = await answer_job(self.worker, {"input": texts, "model": self.model})
        if reply.status != 200:
            raise RuntimeError(f"{self.name}: {reply.status} {reply.body}")
        return reply

    async def stop(self) -> None:
        await self.worker.stop()


class InfinitySubject(Subject):
    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(BASELINE)
        from bench.baseline import raw_engine
        from embedding_worker.config import load_config

        self.engine = raw_engine(load_config(env))

    async def start(self) -> None:
        await self.engine.astart()

    async def embed(self, texts: list[str]) -> Any:
        return await self.engine.embed(sentences=texts)

    async def stop(self) -> None:
        await self.engine.astop()


class SentenceTransformersSubject(Subject):
    def __init__(self, path: Path, dtype: str, device: str) -> None:
        super().__init__("sentence-transformers")
        import torch
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(
            str(path), device=device, model_kwargs={"torch_dtype": getattr(torch, dtype)}
        )

    async def start(self) -> None:
        pass

    async def embed(self, texts: list[str]) -> Any:
        return await asyncio.to_thread(self.model.encode, texts, batch_size=32)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def subjects_for(path: Path, family: str, dtype: str, on_gpu: bool) -> list[tuple[str, Any]]:
    """(name, factory) of every subject of one model and dtype."""
    env = {
        "MODEL_NAMES": str(path),
        "DTYPES": dtype,
        "BATCH_SIZES": "32",
        "ONNX_CACHE_DIR": str(path.parent / "compiled"),
    }
    made: list[tuple[str, Any]] = [
        (BASELINE, lambda: InfinitySubject(env)),
        ("worker", lambda: WorkerSubject("worker", env)),
        ("sentence-transformers", lambda: SentenceTransformersSubject(path, dtype, device())),
    ]
    import importlib.util

    if family == "bert" and importlib.util.find_spec("ctranslate2") is not None:
        ct2_dtype = dtype if on_gpu else "float32"
        made.append(
            (
                "worker ctranslate2",
                lambda: WorkerSubject(
                    "worker ctranslate2", {**env, "BACKEND": "ctranslate2", "DTYPES": ct2_dtype}
                ),
            )
        )
    # ONNX Runtime with CUDA's provider (onnxruntime-gpu), BERT shapes: a Qwen3 export takes
    # minutes of the run's budget.
    if family == "bert" and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if (not on_gpu) or "CUDAExecutionProvider" in providers:
            made.append(
                (
                    "worker optimum",
                    lambda: WorkerSubject(
                        "worker optimum", {**env, "BACKEND": "optimum", "DTYPES": "float32"}
                    ),
                )
            )
    return made


async def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    started = time.monotonic()
    on_gpu = device() == "cuda"
    shapes = TOY_SHAPES if args.toy else SHAPES
    if args.models:
        shapes = {k: v for k, v in shapes.items() if k in args.models.split(",")}
    scale = 1 / 32 if args.toy else 1.0
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    dtypes = tuple(args.dtypes.split(",")) if on_gpu or args.toy else ("float32",)
    for name, shape in shapes.items():
        path = random_model(name, shape, args.cache)
        for dtype in dtypes:
            left = args.budget_s - (time.monotonic() - started)
            if left < 20:
                skipped.append(f"{name} {dtype}")
                continue
            rows += await measure_model(name, path, shape["family"], dtype, on_gpu, scale, args)
    return rows, skipped


async def measure_model(
    name: str,
    path: Path,
    family: str,
    dtype: str,
    on_gpu: bool,
    scale: float,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    subjects: list[Any] = []
    rows: list[dict[str, Any]] = []
    for subject_name, make in subjects_for(path, family, dtype, on_gpu):
        try:
            subject = make()
            await subject.start()
            subjects.append(subject)
        except Exception as exc:  # a backend that cannot run here: said in the table
            log(f"{name} {dtype}: {subject_name} skipped: {type(exc).__name__}: {exc}")
    try:
        tokenizer = _tokenizer(path)
        max_length = int(SHAPES.get(name, TOY_SHAPES.get(name, {})).get("max_seq_length", 512))
        for length, tokens in LENGTHS.items():
            tokens = min(tokens, max_length)
            count = max(16, int(COUNTS[length] * scale))
            texts = _texts_of_length(tokenizer, tokens, count)
            requests = in_requests(texts)

            def throughput(subject: Any, requests: list[list[str]] = requests) -> Any:
                async def call() -> Any:
                    return await asyncio.gather(*(subject.embed(r) for r in requests))

                return call

            for subject in subjects:  # warm-up (kernels, allocator) outside the measure
                await throughput(subject)()
            times = await interleaved({s.name: throughput(s) for s in subjects}, args.rounds)
            one = texts[:1]
            latency = await interleaved(
                {s.name: (lambda s=s, one=one: s.embed(one)) for s in subjects},
                args.latency_rounds,
            )
            for subject in subjects:
                rows.append(
                    {
                        "model": name,
                        "dtype": dtype,
                        "length": f"{length} ({tokens} tok)",
                        "subject": subject.name,
                        "inputs/s": count / statistics.median(times[subject.name]),
                        "ratio": paired_ratio(times, subject.name, BASELINE)
                        if BASELINE in times
                        else float("nan"),
                        "latency_ms": 1e3 * statistics.median(latency[subject.name]),
                    }
                )
            log(f"{name} {dtype} {length}: done")
    finally:
        for subject in subjects:
            await subject.stop()
        subjects.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
    return rows


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def table(rows: list[dict[str, Any]], skipped: list[str], args: argparse.Namespace) -> str:
    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU)"
    lines = [
        "# GPU benchmark results",
        "",
        f"`python -m bench.gpu{' --toy' if args.toy else ''}` on {where}; "
        f"torch {torch.__version__}. "
        "Throughput: requests of 16 inputs, all sent at once, paired medians of "
        f"{args.rounds} interleaved rounds; x infinity is the ratio to the raw Infinity engine "
        "in the same run. Latency: one request of one text, median of "
        f"{args.latency_rounds}.",
        "",
        "| model | dtype | inputs | subject | inputs/s | x infinity | one-text latency (ms) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['length']} | {row['subject']} | "
            f"{row['inputs/s']:.1f} | {row['ratio']:.2f} | {row['latency_ms']:.1f} |"
        )
    if skipped:
        lines += ["", f"Not measured (time budget): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    offline()
    args = parse_args(argv)
    rows, skipped = asyncio.run(run(args))
    text = table(rows, skipped, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
