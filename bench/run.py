"""The worker's benchmark: every layer over the Infinity engine, measured against the engine itself.

    python bench/run.py [--quick] [--device cpu|cuda] [--models minilm,bge-small,...]

Everything is measured in one run, on the same inputs, and reported as ratios to a baseline measured
in that same run (shared machines are noisy: absolute figures are not comparable across runs). The
variants of one measurement are interleaved (A B C, B C A, ...) and medians reported, so that load from
elsewhere falls on all of them alike. Results: a table on stdout and, in bench/results/, latest.md,
latest.json and latest.svg (plus timestamped copies).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Inputs per length, and the random-initialised real-size shapes (speed does not depend on the weights).
LENGTHS = {"short": 12, "medium": 110, "long": 500}
SHAPES: dict[str, dict[str, Any]] = {
    "bge-small": dict(family="bert", hidden_size=384, num_layers=12, num_heads=12,
                      intermediate_size=1536, vocab_size=30522),
    "bge-large": dict(family="bert", hidden_size=1024, num_layers=24, num_heads=16,
                      intermediate_size=4096, vocab_size=30522),
    "qwen3-0.6b": dict(family="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151669),
}
QUICK_MODELS = ["minilm"]
FULL_MODELS = ["minilm", "bge-small", "bge-large", "qwen3-0.6b"]
# Per model: inputs per throughput measurement (short, medium, long), interleaved rounds, and rounds of
# the one-request latency; scaled to what each model costs on a 2-core CPU (a GPU takes them in stride).
PLAN_QUICK = {"minilm": ((128, 32, 8), 3, 30)}
PLAN_FULL = {
    "minilm": ((256, 64, 16), 7, 100),
    "bge-small": ((128, 32, 8), 7, 60),
    "bge-large": ((16, 4, 2), 3, 40),
    "qwen3-0.6b": ((16, 4, 2), 3, 40),
}
REQUEST_SIZE = 16  # inputs per request: many concurrent requests, batched together by the engine


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM only, fewer inputs and repeats")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(FULL_MODELS)}")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from embedding_worker.allocator import keep_freed_memory  # noqa: E402

# This process's malloc as the worker's own (app.build_worker), before any thread allocates: every
# in-process variant then differs only by the layers over the engine. bench/allocator_ab.py measures
# the settings themselves, process against process.
MALLOC_KEPT = ARGS is not None and keep_freed_memory(os.environ)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import report  # noqa: E402
from bench.baseline import engine_tokenizer, raw_engine  # noqa: E402
from embedding_worker import app, encoding, protocol  # noqa: E402
from embedding_worker.config import DEFAULT_MODEL_ID, bundled_model_path, load_config  # noqa: E402
from embedding_worker.dispatch import Worker  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine and peak


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_start": os.getloadavg(),
        "malloc_kept": MALLOC_KEPT,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_peak(device: str, repeats: int) -> dict[str, float]:
    """Best FLOP/s of a large square matmul per dtype: the physical limit the models are held against."""
    n = 8192 if device == "cuda" else 2048
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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


def model_dir(name: str, cache: Path) -> Path:
    """The bundled MiniLM, or a random-initialised model of a real model's shape (built once, cached)."""
    if name == "minilm":
        return bundled_model_path()
    from tests import model_factory

    shape = dict(SHAPES[name])
    family = shape.pop("family")
    path = cache / name
    if (path / "modules.json").exists():
        return path
    log(f"building random-initialised {name} in {path}")
    if family == "bert":
        return model_factory.make_bert_embedder(path, max_position=512, max_seq_length=512, **shape)
    return model_factory.make_qwen3_embedder(path, max_seq_length=8192, **shape)


def model_source(path: Path) -> str:
    """What MODEL_NAMES says for a model directory of model_dir (the bundled MiniLM by its id)."""
    return DEFAULT_MODEL_ID if path == bundled_model_path() else str(path)


def float32_config(name: str) -> Any:
    """The worker configuration the A/B scripts run a bench model with: float32, batches of 32."""
    path = model_dir(name, RESULTS / "models")
    return load_config({"MODEL_NAMES": model_source(path), "DTYPES": "float32", "BATCH_SIZES": "32"})


def in_requests(texts: list[str]) -> list[list[str]]:
    """The texts as the benchmark sends them: requests of REQUEST_SIZE inputs."""
    return [texts[i : i + REQUEST_SIZE] for i in range(0, len(texts), REQUEST_SIZE)]


def texts_of_length(tokenizer: Any, tokens: int, count: int) -> list[str]:
    """`count` different texts of about `tokens` tokens each (special tokens included)."""
    from tests.model_factory import CORPUS

    sentences = [s for s in CORPUS if len(s.split()) > 3 and s.isascii()]
    texts = []
    for i in range(count):
        words: list[str] = []
        j = i * 7
        while len(words) < tokens * 2:
            words += sentences[j % len(sentences)].split()
            j += 1
        lo, hi = 1, len(words)
        while lo < hi:  # the most words that stay within `tokens`
            mid = (lo + hi + 1) // 2
            if len(tokenizer(" ".join(words[:mid]), verbose=False)["input_ids"]) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        texts.append(" ".join(words[:lo]))
    return texts


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


async def interleaved(
    variants: dict[str, Callable[[], Awaitable[Any]]], repeats: int, cpu: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each variant, in rotating order: round r starts with variant r.

    `cpu`, if given, receives this process's CPU seconds per call (all its threads): on a shared
    machine far steadier than wall time, and what the worker's own overhead costs shows up in it."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            await variants[name]()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def paired_ratio(times: dict[str, list[float]], variant: str, baseline: str) -> float:
    """Median over rounds of baseline time / variant time: > 1 means the variant is faster."""
    return statistics.median(b / v for v, b in zip(times[variant], times[baseline]))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Subjects:
    """What is measured for one model: the worker in float32 (and its engine, called raw), the worker
    with DTYPES=auto, and sentence-transformers' own encode.

    A second raw engine, identical to the first, is the A/A control. Under glibc's default malloc two
    identical engines in one process differed here by up to 17% in a row, round after round: each
    engine's thread has its own arena, whose history decided how much memory a batch gave back and
    faulted in again. This process runs with the worker's malloc settings (MALLOC_KEPT), which keep
    that memory. A handler / engine ratio within the A/A gap of its row is not a difference the run
    can resolve.
    """

    def __init__(self, path: Path, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        source = model_source(path)
        self.workers = {}
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
        self.handler = app.runpod_handler(self.workers["float32"])
        self.handler_auto = app.runpod_handler(self.workers["auto"])
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
        got = [await self.workers[d].dispatch(dict(body)) for d in ("float32", "auto")]
        import base64

        a, b = (
            np.stack([np.frombuffer(base64.b64decode(x["embedding"]), "<f4") for x in r.body["data"]])
            for r in got
        )
        return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


async def bench_model(name: str, path: Path, counts: tuple[int, int, int], repeats: int,
                      latency_n: int, device: str, peak: dict[str, float]) -> dict[str, Any]:
    log(f"{name}: loading")
    subjects = Subjects(path, device)
    await subjects.start()
    tokenizer = subjects.st.tokenizer
    result: dict[str, Any] = {
        "model": name, "served_id": subjects.served_id, "max_length": subjects.max_length,
        "auto_dtype": subjects.auto_dtype, "throughput": {}, "latency": {},
    }
    try:
        for (length, target), count in zip(LENGTHS.items(), counts):
            texts = texts_of_length(tokenizer, target, count)
            lengths = subjects.model.tokens.count(texts)
            tokens = sum(min(n, subjects.max_length) for n in lengths)
            flops = sum(forward_flops(subjects.config, min(n, subjects.max_length)) for n in lengths)
            variants = {
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

        def one(call: Callable[[str], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
            return lambda: call(short[next(it) % len(short)])

        variants = {
            "engine": one(lambda t: subjects.engine.embed(sentences=[t])),
            "engine_again": one(lambda t: subjects.engine_again.embed(sentences=[t])),
            "dispatch": one(lambda t: subjects.workers["float32"].dispatch({"model": subjects.served_id, "input": [t]})),
            "handler": one(lambda t: subjects.handler({"id": "l", "input": {"model": subjects.served_id, "input": [t]}})),
        }
        log(f"{name}: latency of one short request, {latency_n} rounds")
        await interleaved(variants, 3)
        times = await interleaved(variants, latency_n)
        for variant, seconds in times.items():
            result["latency"][variant] = {
                "p50_ms": 1e3 * percentile(seconds, 50), "p99_ms": 1e3 * percentile(seconds, 99)
            }
        p50 = {variant: result["latency"][variant]["p50_ms"] for variant in variants}
        result["latency"]["added_p50_ms"] = p50["handler"] - p50["engine"]
        result["latency"]["engine_again_added_p50_ms"] = p50["engine_again"] - p50["engine"]
        result["process_peak_rss_mb"] = peak_rss_mb()
    finally:
        await subjects.stop()
        del subjects
        gc.collect()
    return result


# --------------------------------------------------------------------------- serialisation


def bench_serialisation(repeats: int) -> dict[str, Any]:
    """256 unit vectors of 1024 dims, answered as runpod sends a job result: json.dumps of the body."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((256, 1024)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    numbers = vectors.size

    def widened() -> str:  # float32 -> Python float via tolist(): 17 significant digits
        return json.dumps(protocol.embedding_response("m", vectors.tolist(), 1))

    def shortest() -> str:
        return json.dumps(protocol.embedding_response("m", encoding.encode_vectors(vectors, "float"), 1))

    def base64_() -> str:
        return json.dumps(protocol.embedding_response("m", encoding.encode_vectors(vectors, "base64"), 1))

    variants = {"float_tolist": widened, "float_worker": shortest, "base64_worker": base64_}
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(repeats):
        names = list(variants)
        for name in names[r % 3:] + names[: r % 3]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    import base64

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
    out["base64_speedup_vs_float_worker"] = paired_ratio(
        {k: v for k, v in times.items()}, "base64_worker", "float_worker"
    )
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
    """Seconds from process start to the line holding `marker`, and to exit; the child's peak RSS."""
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
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
        raise RuntimeError(f"{cmd[1]} failed ({proc.returncode}):\n{''.join(lines[-20:])}")
    return {"first_answer_s": first, "exit_s": total, "peak_rss_mb": peak[0]}


def bench_cold_start(path: Path, repeats: int) -> dict[str, Any]:
    """`python handler.py --test_input` (the worker, float32) against the raw engine's own start."""
    source = model_source(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update({"PYTHONUNBUFFERED": "1", "MODEL_NAMES": source, "DTYPES": "float32",
                "LOG_LEVEL": "WARNING", "RUNPOD_DEBUG_LEVEL": "INFO"})
    job = json.dumps({"input": {"input": ["hello world"]}})
    commands = {
        "engine": ([sys.executable, "bench/engine_start.py", str(path), "float32"], "first answer"),
        "worker": ([sys.executable, "handler.py", "--test_input", job], "completed successfully"),
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in commands}
    for r in range(repeats):
        for name in (list(commands) if r % 2 == 0 else list(commands)[::-1]):
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


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection that posts pre-encoded JSON: the leanest client Python has.

    httpx costs the client ~2.5 ms of CPU a request here (one pool of 64: ~10 ms), CPU the server on
    the same 2 cores then lacks; this one ~0.1 ms, so the figure is the server's, not the client's.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> "KeepAliveClient":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    @staticmethod
    def request(path: str, body: Any) -> bytes:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        return (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data

    async def send(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        at = head.lower().index(b"content-length:") + len(b"content-length:")
        body = await self.reader.readexactly(int(head[at:head.index(b"\r\n", at)]))
        return status, body

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def one_text_each_to_server(port: int, posts: list[bytes], concurrency: int) -> None:
    """`posts` (KeepAliveClient.request bodies) over `concurrency` keep-alive connections."""
    todo = iter(posts)

    async def connection() -> None:
        # Fresh connections each round: uvicorn closes idle ones after 5 s.
        client = await KeepAliveClient.connect(port)
        try:
            for request in todo:
                status, body = await client.send(request)
                if status != 200:
                    raise RuntimeError(f"server answered {status}: {body[:300]!r}")
        finally:
            await client.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


async def one_text_each_to_engine(engine: Any, texts: list[str], concurrency: int) -> None:
    """The same requests straight into an Infinity engine, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> None:
        async with gate:
            await engine.embed(sentences=[text])

    await asyncio.gather(*(one(t) for t in texts))


def start_local_server(checkout: Path | str, env: dict[str, str], log_file: Any) -> tuple[subprocess.Popen, int]:
    """`handler.py --serve` of `checkout` on a free loopback port, float32, with `env` on top."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    full_env.update({"MODEL_NAMES": DEFAULT_MODEL_ID, "DTYPES": "float32", "LOG_LEVEL": "WARNING", **env})
    server = subprocess.Popen(
        [sys.executable, "handler.py", "--serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=checkout, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
    )
    return server, port


async def wait_listening(server: subprocess.Popen, port: int, log_file: Any, limit_s: float = 600) -> None:
    """Until the server has loaded its model and listens; its log's tail if it exits instead."""
    deadline = time.monotonic() + limit_s
    while True:
        if server.poll() is not None:
            log_file.seek(0)
            raise RuntimeError(f"server exited: {log_file.read()[-2000:].decode(errors='replace')}")
        try:
            await (await KeepAliveClient.connect(port)).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not listen within {limit_s:g} s") from None
            await asyncio.sleep(0.5)


async def bench_server(path: Path, repeats: int, requests: int) -> dict[str, Any]:
    """The local HTTP server (`python handler.py --serve`, where this branch has it) in its own process,
    as clients meet it, at concurrency 1, 16 and 64, one text per request, short and medium texts;
    against the raw engine (in this process) answering the same requests at the same concurrency."""
    if not (ROOT / "src" / "embedding_worker" / "server.py").exists():
        return {"skipped": "embedding_worker.server is not part of this branch"}
    source = model_source(path)
    log_file = tempfile.TemporaryFile()
    server, port = start_local_server(ROOT, {"MODEL_NAMES": source}, log_file)
    # The baseline: Infinity on its own, with the server's EngineArgs; a second one is the A/A control.
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
                    "engine_again": lambda t=texts, c=concurrency: one_text_each_to_engine(engine_again, t, c),
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
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()
        await engine.astop()
        await engine_again.astop()
    return out


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    unknown = set(models) - set(FULL_MODELS)
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {FULL_MODELS}")
    plans = PLAN_QUICK if args.quick else PLAN_FULL
    repeats = args.repeats or (3 if args.quick else 5)
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
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
                await bench_model(name, path, counts, args.repeats or rounds, latency_rounds, device, peak)
            )
            log(f"{name}: cold start")
            results["cold_start"][name] = bench_cold_start(path, 2 if args.quick else 3)
        except Exception as exc:
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
    log("malloc settings: processes with and without them")
    from bench import allocator_ab

    lengths = ("short", "medium", "long")
    results["allocator"] = {
        "model": "minilm",
        "inputs": dict(zip(lengths, PLAN_FULL["minilm"][0])),
        "pairs": 2 if args.quick else 4,
        "rows": allocator_ab.compare("minilm", ",".join(lengths), list(PLAN_FULL["minilm"][0]),
                                     pairs=2 if args.quick else 4, rounds=2 if args.quick else 3),
    }
    log("local HTTP server")
    results["server"] = await bench_server(bundled_model_path(), repeats, 256 if args.quick else 1024)
    # The peak again at the end, best of both: the machine may be busier at one time than the other.
    for dtype, flops in matmul_peak(device, 10).items():
        peak[dtype] = max(peak[dtype], flops)
    for model in results["models"]:
        for row in model["throughput"].values():
            for v in row["variants"].values():
                v["of_matmul_peak"] = v["flop_per_s"] / peak.get(v["dtype"], peak["float32"])
    results["machine"]["load_average_end"] = os.getloadavg()
    return results


def main() -> None:
    args = ARGS or parse_args()
    results = asyncio.run(run(args))
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
