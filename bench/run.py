"""The worker's benchmark: every layer over the Infinity engine, measured against the engine itself.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.run [--quick] [--device cpu|cuda]
        [--models minilm,bge-small,...]

Everything is measured in one run, on the same inputs, and reported as ratios to a baseline
measured in that same run (shared machines are noisy: absolute figures are not comparable across
runs). The variants of one measurement are interleaved (A B C, B C A, ...) and medians reported, so
that load from elsewhere falls on all of them alike. Results: a table on stdout and, in
bench/results/, latest.md, latest.json and latest.svg (plus timestamped copies).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import allocator_ab, report
from bench.baseline import engine_tokenizer, raw_engine
from bench.common import (
    FULL_MODELS,
    LENGTHS,
    REQUEST_SIZE,
    RESULTS,
    ROOT,
    KeepAliveClient,
    in_requests,
    interleaved,
    log,
    model_dir,
    model_source,
    one_text_each_to_engine,
    one_text_each_to_server,
    paired_ratio,
    start_local_server,
    stop_server,
    texts_of_length,
    wait_listening,
)
from embedding_worker import encoding
from embedding_worker.allocator import keep_freed_memory
from embedding_worker.config import bundled_model_path, load_config
from embedding_worker.cpu import processor_name
from embedding_worker.dispatch import Worker
from embedding_worker.engines.dtype import cpu_has_native_bf16
from embedding_worker.operations.embeddings import embedding_response
from embedding_worker.transports.runpod import answer_job, runpod_handler

QUICK_MODELS = ["minilm"]
# Per model: inputs per throughput measurement (short, medium, long), interleaved rounds, and rounds
# of the one-request latency; scaled to what each model costs on a 2-core CPU (a GPU takes them in
# stride).
PLAN_QUICK = {"minilm": ((128, 32, 8), 3, 30)}
PLAN_FULL = {
    "minilm": ((256, 64, 16), 7, 100),
    "bge-small": ((128, 32, 8), 7, 60),
    "bge-large": ((16, 4, 2), 3, 40),
    "qwen3-0.6b": ((16, 4, 2), 3, 40),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="MiniLM only, fewer inputs and repeats"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(FULL_MODELS)}")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def prepare_process(args: argparse.Namespace) -> bool:
    """The process as the worker's, before any model loads or thread allocates; True if malloc now
    keeps freed memory.

    The malloc settings are the worker's own (startup.build_worker): every in-process variant then
    differs only by the layers over the engine. bench/allocator_ab.py measures the settings
    themselves, process against process. The environment is set here so that the child processes
    (cold starts, the local server) get it too.
    """
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first looks for a CUDA device
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return keep_freed_memory(os.environ)


# --------------------------------------------------------------------------- machine and peak


def machine(malloc_kept: bool) -> dict[str, Any]:
    info = {
        "cpu": processor_name(),
        "cores": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        ),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_start": os.getloadavg(),
        "malloc_kept": malloc_kept,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_peak(device: str, repeats: int) -> dict[str, float]:
    """Best FLOP/s of a large square matmul per dtype: the physical limit the models are held
    against."""
    n = 8192 if device == "cuda" else 2048
    dtypes = {"float32": torch.float32}
    # Without native bfloat16 a CPU emulates it: minutes a matmul, and no dtype the worker picks.
    if device == "cuda" or cpu_has_native_bf16():
        dtypes["bfloat16"] = torch.bfloat16
    if device == "cuda":
        dtypes["float16"] = torch.float16
    peak = {}
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(repeats):  # the first one warms up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            (a @ b).sum().item()
            best = min(best, time.perf_counter() - start)
        peak[name] = 2 * n**3 / best
        del a, b
    return peak


# --------------------------------------------------------------------------- models and inputs


def forward_flops(config: Any, tokens: int) -> float:
    """Forward FLOPs of one sequence of `tokens` tokens: weight matmuls plus attention scores."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    mlp = 3 * h * inter if config.model_type.startswith("qwen") else 2 * h * inter
    weights = h * heads * head_dim * 2 + 2 * h * kv * head_dim + mlp
    return layers * (2 * tokens * weights + 4 * tokens * tokens * heads * head_dim)


# --------------------------------------------------------------------------- measuring


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Subjects:
    """What is measured for one model: the worker in float32 (and its engine, called raw), the
    worker with DTYPES=auto, and sentence-transformers' own encode.

    A second raw engine, identical to the first, is the A/A control. Under glibc's default malloc
    two identical engines in one process differ by up to 17% in a row, round after round: each
    engine's thread has its own arena, whose history decides how much memory a batch gives back and
    faults in again. This process runs with the worker's malloc settings (prepare_process), which
    keep that memory. A handler / engine ratio within the A/A gap of its row is not a difference the
    run can resolve.
    """

    def __init__(self, path: Path, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        source = model_source(path)
        self.workers: dict[str, Worker] = {}
        for dtype in ("float32", "auto"):
            config = load_config({"MODEL_NAMES": source, "DTYPES": dtype, "BATCH_SIZES": "32"})
            self.workers[dtype] = Worker.from_config(config)
        auto_engine = self.workers["auto"].registry.models[0].engine
        loaded = next(auto_engine._model_replicas[0].parameters()).dtype  # what `auto` became here
        self.auto_dtype = str(loaded).removeprefix("torch.")
        self.model = self.workers["float32"].registry.models[0]
        self.served_id = self.model.served_id
        # Infinity on its own, with the float32 worker's EngineArgs (same files, same dtype)
        self.engine = raw_engine(self.workers["float32"].config)
        self.engine_again = raw_engine(self.workers["float32"].config)
        self.handler = runpod_handler(self.workers["float32"])
        self.handler_auto = runpod_handler(self.workers["auto"])
        self.st = SentenceTransformer(str(path), device=device)
        self.config = self.st[0].auto_model.config
        self.max_length = self.model.max_length

    async def start(self) -> None:
        await self.engine.astart()
        await self.engine_again.astart()
        for worker in self.workers.values():
            await worker.start()

    async def stop(self) -> None:
        await self.engine.astop()
        await self.engine_again.astop()
        for worker in self.workers.values():
            await worker.stop()

    async def raw(self, texts: list[str], engine: Any = None) -> None:
        engine = engine or self.engine
        await asyncio.gather(*(engine.embed(sentences=c) for c in in_requests(texts)))

    async def via(self, handler: Any, texts: list[str]) -> None:
        jobs = [
            {"id": f"bench-{i}", "input": {"model": self.served_id, "input": chunk}}
            for i, chunk in enumerate(in_requests(texts))
        ]
        outputs = await asyncio.gather(*(handler(job) for job in jobs))
        for output in outputs:
            if "error" in output:
                raise RuntimeError(output["error"])

    async def sentence_transformers(self, texts: list[str]) -> None:
        self.st.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    async def cosine_auto_vs_float32(self, texts: list[str]) -> float:
        body = {"model": self.served_id, "input": texts, "encoding_format": "base64"}
        got = [await answer_job(self.workers[d], dict(body)) for d in ("float32", "auto")]
        a, b = (
            np.stack(
                [np.frombuffer(base64.b64decode(x["embedding"]), "<f4") for x in r.body["data"]]
            )
            for r in got
        )
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        return float(np.min(np.sum(a * b, axis=1) / norms))


async def bench_model(
    name: str,
    path: Path,
    counts: tuple[int, int, int],
    repeats: int,
    latency_n: int,
    device: str,
    peak: dict[str, float],
) -> dict[str, Any]:
    """One model's throughput and latency rows; its engines are stopped when it returns."""
    log(f"{name}: loading")
    subjects = Subjects(path, device)
    await subjects.start()
    try:
        return await measure_model(subjects, name, counts, repeats, latency_n, peak)
    finally:
        await subjects.stop()


async def measure_model(
    subjects: Subjects,
    name: str,
    counts: tuple[int, int, int],
    repeats: int,
    latency_n: int,
    peak: dict[str, float],
) -> dict[str, Any]:
    tokenizer = subjects.st.tokenizer
    result: dict[str, Any] = {
        "model": name,
        "served_id": subjects.served_id,
        "max_length": subjects.max_length,
        "auto_dtype": subjects.auto_dtype,
        "throughput": {},
        "latency": {},
    }
    for (length, target), count in zip(LENGTHS.items(), counts):
        texts = texts_of_length(tokenizer, target, count)
        lengths = [min(n, subjects.max_length) for n in subjects.model.tokens.count(texts)]
        tokens = sum(lengths)
        flops = sum(forward_flops(subjects.config, n) for n in lengths)
        variants: dict[str, Callable[[], Awaitable[Any]]] = {
            "engine": lambda t=texts: subjects.raw(t),
            "engine_again": lambda t=texts: subjects.raw(t, subjects.engine_again),
            "handler": lambda t=texts: subjects.via(subjects.handler, t),
            "handler_auto": lambda t=texts: subjects.via(subjects.handler_auto, t),
            "sentence_transformers": lambda t=texts: subjects.sentence_transformers(t),
        }
        log(f"{name}/{length}: {count} inputs, {tokens / count:.0f} tokens each, {repeats} rounds")
        await interleaved({k: (lambda v=v, t=texts: v(t[:32])) for k, v in variants.items()}, 1)
        cpu: dict[str, list[float]] = {}
        times = await interleaved(variants, repeats, cpu)
        row: dict[str, Any] = {"inputs": count, "tokens_per_input": tokens / count, "variants": {}}
        for variant, seconds in times.items():
            median = statistics.median(seconds)
            dtype = subjects.auto_dtype if variant == "handler_auto" else "float32"
            fps = flops / median
            row["variants"][variant] = {
                "dtype": dtype,
                "inputs_per_s": count / median,
                "tokens_per_s": tokens / median,
                "flop_per_s": fps,
                "of_matmul_peak": fps / peak.get(dtype, peak["float32"]),
                "vs_engine": paired_ratio(times, variant, "engine"),
                "vs_engine_again": paired_ratio(times, variant, "engine_again"),
                "cpu_vs_engine": paired_ratio(cpu, variant, "engine"),
            }
        result["throughput"][length] = row
    medium = texts_of_length(tokenizer, LENGTHS["medium"], 32)
    result["cosine_auto_vs_float32"] = await subjects.cosine_auto_vs_float32(medium)

    short = texts_of_length(tokenizer, LENGTHS["short"], latency_n)
    it = iter(range(10**9))
    served = subjects.served_id

    def one(call: Callable[[str], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        return lambda: call(short[next(it) % len(short)])

    latency_variants = {
        "engine": one(lambda t: subjects.engine.embed(sentences=[t])),
        "engine_again": one(lambda t: subjects.engine_again.embed(sentences=[t])),
        "dispatch": one(
            lambda t: answer_job(subjects.workers["float32"], {"model": served, "input": [t]})
        ),
        "handler": one(
            lambda t: subjects.handler({"id": "l", "input": {"model": served, "input": [t]}})
        ),
    }
    log(f"{name}: latency of one short request, {latency_n} rounds")
    await interleaved(latency_variants, 3)
    times = await interleaved(latency_variants, latency_n)
    for variant, seconds in times.items():
        result["latency"][variant] = {
            "p50_ms": 1e3 * percentile(seconds, 50),
            "p99_ms": 1e3 * percentile(seconds, 99),
        }
    p50 = {variant: result["latency"][variant]["p50_ms"] for variant in latency_variants}
    result["latency"]["added_p50_ms"] = p50["handler"] - p50["engine"]
    result["latency"]["engine_again_added_p50_ms"] = p50["engine_again"] - p50["engine"]
    result["process_peak_rss_mb"] = peak_rss_mb()
    return result


# --------------------------------------------------------------------------- serialisation


def bench_serialisation(repeats: int) -> dict[str, Any]:
    """256 unit vectors of 1024 dims, answered as runpod sends a job result: json.dumps of the
    body."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((256, 1024)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    numbers = vectors.size

    def widened() -> str:  # float32 -> Python float via tolist(): 17 significant digits
        return json.dumps(embedding_response("m", vectors.tolist(), 1))

    def shortest() -> str:
        return json.dumps(embedding_response("m", encoding.encode_vectors(vectors, "float"), 1))

    def base64_() -> str:
        return json.dumps(embedding_response("m", encoding.encode_vectors(vectors, "base64"), 1))

    variants = {"float_tolist": widened, "float_worker": shortest, "base64_worker": base64_}
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(repeats):
        names = list(variants)
        for name in names[r % 3 :] + names[: r % 3]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)

    out: dict[str, Any] = {"vectors": list(vectors.shape)}
    for name, fn in variants.items():
        text = fn()
        data = json.loads(text)["data"]
        if name.startswith("base64"):
            back = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
        else:
            back = np.asarray([d["embedding"] for d in data], dtype=np.float32)
        out[name] = {
            "bytes_per_number": len(text.encode()) / numbers,
            "ms": 1e3 * statistics.median(times[name]),
            "exact": bool(np.array_equal(back, vectors)),
        }
    out["base64_speedup_vs_float_worker"] = paired_ratio(times, "base64_worker", "float_worker")
    return out


# --------------------------------------------------------------------------- cold start


def _high_water_rss_mb(pid: int) -> float:
    """The process's peak RSS so far (VmHWM; reset by exec, unlike a child's ru_maxrss, which starts
    from the parent's size at fork)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _timed_child(cmd: list[str], env: dict[str, str], marker: str) -> dict[str, float]:
    """Seconds from process start to the line holding `marker`, and to exit; the child's peak
    RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = [float("nan")]

    def watch() -> None:
        while proc.poll() is None:
            rss = _high_water_rss_mb(proc.pid)
            if rss == rss:
                peak[0] = rss
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    first = None
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if first is None and marker in line:
            first = time.perf_counter() - start
    proc.wait()
    total = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0 or first is None:
        name = " ".join(cmd[1:3])
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{''.join(lines[-20:])}")
    return {"first_answer_s": first, "exit_s": total, "peak_rss_mb": peak[0]}


def bench_cold_start(path: Path, repeats: int) -> dict[str, Any]:
    """`python handler.py --test_input` (the worker, float32) against the raw engine's own start
    (bench/engine_start.py, from the same environment)."""
    source = model_source(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "MODEL_NAMES": source,
            "DTYPES": "float32",
            "LOG_LEVEL": "WARNING",
            "RUNPOD_DEBUG_LEVEL": "INFO",
        }
    )
    job = json.dumps({"input": {"input": ["hello world"]}})
    commands = {
        "engine": ([sys.executable, "-m", "bench.engine_start"], "first answer"),
        "worker": ([sys.executable, "handler.py", "--test_input", job], "completed successfully"),
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in commands}
    for r in range(repeats):
        for name in list(commands) if r % 2 == 0 else list(commands)[::-1]:
            cmd, marker = commands[name]
            runs[name].append(_timed_child(cmd, env, marker))
    out: dict[str, Any] = {}
    for name, items in runs.items():
        out[name] = {
            "first_answer_s": statistics.median(i["first_answer_s"] for i in items),
            "exit_s": statistics.median(i["exit_s"] for i in items),
            "peak_rss_mb": max(i["peak_rss_mb"] for i in items),
        }
    out["worker_vs_engine"] = statistics.median(
        w["first_answer_s"] / e["first_answer_s"] for w, e in zip(runs["worker"], runs["engine"])
    )
    return out


# --------------------------------------------------------------------------- local HTTP server


async def bench_server(path: Path, repeats: int, requests: int) -> dict[str, Any]:
    """The local HTTP server (`python handler.py --serve`) in its own process, as clients meet it,
    at concurrency 1, 16 and 64, one text per request, short and medium texts; against the raw
    engine (in this process) answering the same requests at the same concurrency."""
    source = model_source(path)
    log_file = tempfile.TemporaryFile()
    server, port = start_local_server(ROOT, {"MODEL_NAMES": source}, log_file)
    # The baseline: Infinity on its own, with the server's EngineArgs; a second one is the A/A
    # control.
    config = load_config({"MODEL_NAMES": source, "DTYPES": "float32"})
    engine, engine_again = raw_engine(config), raw_engine(config)
    tokenizer = engine_tokenizer(engine)
    await engine.astart()
    await engine_again.astart()
    out: dict[str, Any] = {}
    try:
        await wait_listening(server, port, log_file)
        for length, most in (("short", requests), ("medium", max(16, requests // 4))):
            for concurrency in (1, 16, 64):
                # Rounds of a few seconds each: one client alone gets through far fewer requests.
                count = most if concurrency > 1 else max(16, most // 8)
                texts = texts_of_length(tokenizer, LENGTHS[length], count)
                posts = [KeepAliveClient.request("/v1/embeddings", {"input": [t]}) for t in texts]

                variants = {
                    "engine": lambda t=texts, c=concurrency: one_text_each_to_engine(engine, t, c),
                    "engine_again": lambda t=texts, c=concurrency: one_text_each_to_engine(
                        engine_again, t, c
                    ),
                    "server": lambda p=posts, c=concurrency: one_text_each_to_server(port, p, c),
                }
                await interleaved(variants, 1)
                cpu: dict[str, list[float]] = {}
                times = await interleaved(variants, repeats, cpu)
                out[f"{length} c{concurrency}"] = {
                    "engine_rps": count / statistics.median(times["engine"]),
                    "server_rps": count / statistics.median(times["server"]),
                    "server_vs_engine": paired_ratio(times, "server", "engine"),
                    "engine_again_vs_engine": paired_ratio(times, "engine_again", "engine"),
                    # CPU of this process while the server answers: the HTTP client's own cost
                    "client_cpu_ms_per_request": 1e3 * statistics.median(cpu["server"]) / count,
                }
    except Exception as exc:  # say so, keep the rest of the run
        out = {"skipped": f"server benchmark failed: {type(exc).__name__}: {exc}"}
    finally:
        stop_server(server)
        log_file.close()
        await engine.astop()
        await engine_again.astop()
    return out


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, malloc_kept: bool) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    default_models = QUICK_MODELS if args.quick else FULL_MODELS
    models = args.models.split(",") if args.models else default_models
    unknown = set(models) - set(FULL_MODELS)
    if unknown:
        names = ", ".join(sorted(unknown))
        raise SystemExit(f"unknown model(s) {names}; choose from {FULL_MODELS}")
    plans = PLAN_QUICK if args.quick else PLAN_FULL
    repeats = args.repeats or (3 if args.quick else 5)
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(malloc_kept),
        "quick": args.quick,
        "request_size": REQUEST_SIZE,
    }
    log(f"device {device}; matmul peak")
    results["matmul_peak_flop_per_s"] = peak = matmul_peak(device, 10)
    log("serialisation")
    results["serialisation"] = bench_serialisation(max(repeats, 5))
    cache = args.out / "models"
    cache.mkdir(parents=True, exist_ok=True)
    results["models"] = []
    results["cold_start"] = {}
    for name in models:
        path = model_dir(name, cache)
        counts, rounds, latency_rounds = plans.get(name, PLAN_FULL[name])
        try:  # one model failing (out of memory, say) must not lose the others' figures
            results["models"].append(
                await bench_model(
                    name, path, counts, args.repeats or rounds, latency_rounds, device, peak
                )
            )
            log(f"{name}: cold start")
            results["cold_start"][name] = bench_cold_start(path, 2 if args.quick else 3)
        except Exception as exc:
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
        gc.collect()  # this model's engines and workers, before the next model loads
    log("malloc settings: processes with and without them")
    lengths = ("short", "medium", "long")
    pairs = 2 if args.quick else 4
    results["allocator"] = {
        "model": "minilm",
        "inputs": dict(zip(lengths, PLAN_FULL["minilm"][0])),
        "pairs": pairs,
        "rows": allocator_ab.compare(
            "minilm",
            ",".join(lengths),
            list(PLAN_FULL["minilm"][0]),
            pairs=pairs,
            rounds=2 if args.quick else 3,
        ),
    }
    log("local HTTP server")
    requests = 256 if args.quick else 1024
    results["server"] = await bench_server(bundled_model_path(), repeats, requests)
    # The peak again at the end, best of both: the machine may be busier at one time than the
    # other.
    for dtype, flops in matmul_peak(device, 10).items():
        peak[dtype] = max(peak[dtype], flops)
    for model in results["models"]:
        for row in model["throughput"].values():
            for v in row["variants"].values():
                v["of_matmul_peak"] = v["flop_per_s"] / peak.get(v["dtype"], peak["float32"])
    results["machine"]["load_average_end"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    malloc_kept = prepare_process(args)
    results = asyncio.run(run(args, malloc_kept))
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = report.markdown(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for stem in ("latest", stamp):
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=float))
        (args.out / f"{stem}.md").write_text(markdown)
        (args.out / f"{stem}.svg").write_text(report.svg_chart(results))
    print(markdown)
    log(f"written to {args.out}/latest.md, latest.json and latest.svg")


if __name__ == "__main__":
    main()
