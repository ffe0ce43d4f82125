"""The backends against torch in one run: ONNX Runtime (BACKEND=optimum) and CTranslate2, in
float32 and int8, against the torch path in float32 and with DTYPES=auto.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.backends [--models minilm,bge-base]
        [--lengths short,medium,long] [--rounds 5] [--scale 1.0] [--out bench/results/backends.md]

Every variant is a whole worker (its dispatch, batching and model), built from the same
configuration but for BACKEND and DTYPES, called in interleaved rounds with the same requests of
16 inputs, all sent at once. Ratios are paired medians of the rounds against torch float32; the
cosine columns compare each variant's vectors with torch float32's (min and mean over the
texts). "runtime share" is the part of the variant's wall time spent inside the runtime's own
call (ONNX Runtime's session, CTranslate2's encoder; torch's forward for the torch rows is not
separated): what is left is tokenizing, padding, pooling and the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS,
    in_requests,
    interleaved,
    log,
    model_dir,
    offline,
    paired_ratio,
)
from bench.common import texts_of_length as _texts_of_length
from embedding_worker.cpu import cpu_flags, processor_name
from embedding_worker.transports.runpod import answer_job

LENGTHS = {"short": 12, "medium": 110, "long": 500}
# Inputs per round at scale 1: fewer as they grow, so that each round takes about as long.
COUNTS = {"short": 256, "medium": 64, "long": 16}
VARIANTS = {
    "torch float32": ("torch", "float32"),
    "torch auto": ("torch", "auto"),
    "optimum float32": ("optimum", "float32"),
    "optimum int8": ("optimum", "int8"),
    "ctranslate2 float32": ("ctranslate2", "float32"),
    "ctranslate2 int8": ("ctranslate2", "int8"),
}
BASELINE = "torch float32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__)
    parser.add_argument("--models", default="minilm,bge-base")
    parser.add_argument("--lengths", default="short,medium,long")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="inputs per round, times this")
    parser.add_argument("--out", type=Path, default=RESULTS / "backends.md")
    parser.add_argument("--cache", type=Path, default=RESULTS / "models")
    return parser.parse_args(argv)


def model_path(name: str, cache: Path) -> Path:
    """The bundled MiniLM, or a random-initialised model of bge-base-en-v1.5's shape (CLS pooling
    in the real one; speed does not depend on it)."""
    if name not in ("minilm", "bge-base"):
        raise SystemExit(f"unknown model {name!r}: minilm or bge-base")
    return model_dir(name, cache)


class RuntimeClock:
    """Seconds spent inside a compiled model's runtimes (wrapped in place)."""

    def __init__(self, model: Any) -> None:
        self.seconds = 0.0
        replicas = getattr(model, "replicas", None)
        if replicas is None:
            return
        for i, runtime in enumerate(replicas.replicas):
            replicas.replicas[i] = self._timed(runtime)

    def _timed(self, runtime: Any) -> Any:
        def call(batch: Any) -> Any:
            started = time.perf_counter()
            try:
                return runtime(batch)
            finally:
                self.seconds += time.perf_counter() - started

        return call


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from embedding_worker.config import load_config
    from embedding_worker.dispatch import Worker

    rows: list[dict[str, Any]] = []
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if BASELINE not in variants:
        variants.insert(0, BASELINE)
    for model_name in args.models.split(","):
        path = model_path(model_name, args.cache)
        workers: dict[str, Any] = {}
        clocks: dict[str, RuntimeClock] = {}
        for variant in variants:
            backend, dtype = VARIANTS[variant]
            log(f"{model_name}: loading {variant}")
            started = time.perf_counter()
            worker = Worker.from_config(
                load_config(
                    {
                        "MODEL_NAMES": str(path),
                        "BACKEND": backend,
                        "DTYPES": dtype,
                        "BATCH_SIZES": "32",
                        "ONNX_CACHE_DIR": str(args.cache / "compiled"),
                    }
                )
            )
            await worker.start()
            log(f"{model_name}: {variant} ready in {time.perf_counter() - started:.1f} s")
            workers[variant] = worker
            clocks[variant] = RuntimeClock(worker.registry.models[0])
        model = workers[BASELINE].registry.models[0]
        served = model.served_id
        for length in args.lengths.split(","):
            tokens = min(LENGTHS[length], model.max_length)
            count = max(4, int(COUNTS[length] * args.scale))
            texts = _texts_of_length(model.tokens.tokenizer, tokens, count)
            requests = in_requests(texts)

            def call(
                worker: Any, requests: list[list[str]] = requests, served: str = served
            ) -> Any:
                async def run() -> list[Any]:
                    return await asyncio.gather(
                        *(answer_job(worker, {"input": r, "model": served}) for r in requests)
                    )

                return run

            vectors: dict[str, np.ndarray] = {}
            for variant, worker in workers.items():
                replies = await call(worker)()  # warm-up round, and the vectors compared
                bodies = [reply.body for reply in replies]
                vectors[variant] = np.array(
                    [item["embedding"] for body in bodies for item in body["data"]],
                    dtype=np.float32,
                )
            for clock in clocks.values():
                clock.seconds = 0.0
            log(f"{model_name} {length}: {args.rounds} rounds of {count} inputs")
            times = await interleaved({v: call(w) for v, w in workers.items()}, args.rounds)
            reference = vectors[BASELINE]
            for variant in workers:
                got = vectors[variant]
                cos = (got * reference).sum(-1) / (
                    np.linalg.norm(got, axis=-1) * np.linalg.norm(reference, axis=-1)
                )
                wall = sum(times[variant])
                rows.append(
                    {
                        "model": model_name,
                        "length": f"{length} ({tokens} tok)",
                        "variant": variant,
                        "inputs/s": count / float(np.median(times[variant])),
                        "ratio": paired_ratio(times, variant, BASELINE),
                        "cos_min": float(cos.min()),
                        "cos_mean": float(cos.mean()),
                        "runtime_share": clocks[variant].seconds / wall if wall else 0.0,
                        "quality": workers[variant]
                        .registry.models[0]
                        .describe()
                        .get("int8_cosine_to_float32"),
                    }
                )
        for worker in workers.values():
            await worker.stop()
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| model | inputs | variant | inputs/s | x torch float32 | cosine to torch float32 "
        "(min / mean) | runtime share |",
        "| --- | --- | --- | ---: | ---: | --- | ---: |",
    ]
    for row in rows:
        share = f"{row['runtime_share']:.0%}" if row["runtime_share"] else ""
        lines.append(
            f"| {row['model']} | {row['length']} | {row['variant']} | {row['inputs/s']:.1f} | "
            f"{row['ratio']:.2f} | {row['cos_min']:.6f} / {row['cos_mean']:.6f} | {share} |"
        )
    words = cpu_flags()
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in words)
    header = (
        f"`python -m bench.backends --models {args.models} --lengths {args.lengths} "
        f"--rounds {args.rounds} --scale {args.scale}` on {processor_name()} "
        f"({os.cpu_count()} cores; {flags or 'no AVX flags read'}); paired medians of "
        f"{args.rounds} interleaved rounds.\n\n"
    )
    return header + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    offline()
    args = parse_args(argv)
    rows = asyncio.run(measure(args))
    text = table(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
