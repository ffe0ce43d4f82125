"""The worker's malloc settings (src/embedding_worker/allocator.py) against glibc's defaults.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.allocator_ab [--model minilm] [--pairs 4]
        [--lengths short,medium,long] [--rounds 3]

The settings are per process, so this cannot interleave within one: it alternates pairs of
processes (kept, defaults; then defaults, kept; ...), each running a raw Infinity engine over the
same inputs as bench/run.py's throughput rows, and reports per length the median over pairs of the
defaults' time / the kept time (> 1: keeping is faster), with the page faults and kernel CPU time of
a round and the memory the process holds after the rounds of each length (short, then medium, then
long).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Any

from bench.baseline import engine_tokenizer, raw_engine
from bench.common import LENGTHS, ROOT, float32_config, in_requests, texts_of_length
from embedding_worker.allocator import is_malloc_variable, keep_freed_memory

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """One process: a raw engine, `args.rounds` rounds per length after a warm-up round."""
    # before the engine's threads allocate: a thread keeps the heap it first got
    if args.child == "kept" and not keep_freed_memory(os.environ, True):
        raise SystemExit("the malloc settings could not be applied here")
    engine = raw_engine(float32_config(args.model))
    await engine.astart()
    loop = asyncio.get_running_loop()
    out = {}
    for length, count in zip(args.lengths.split(","), args.inputs):
        texts = texts_of_length(engine_tokenizer(engine), LENGTHS[length], count)
        requests = in_requests(texts)
        seconds, faults, kernel = [], [], []
        for r in range(args.rounds + 1):
            before, start = resource.getrusage(resource.RUSAGE_SELF), loop.time()
            await asyncio.gather(*(engine.embed(sentences=q) for q in requests))
            after, end = resource.getrusage(resource.RUSAGE_SELF), loop.time()
            if r:  # the first round warms up (and grows the kept heap)
                seconds.append(end - start)
                faults.append(after.ru_minflt - before.ru_minflt)
                kernel.append(after.ru_stime - before.ru_stime)
        out[length] = {
            "seconds": statistics.median(seconds),
            "faults": statistics.median(faults),
            "kernel_s": statistics.median(kernel),
            # what the process holds after these rounds (the lengths run in order)
            "rss_mb": resident_mb(),
        }
    await engine.astop()
    return out


def run_child(
    setting: str, model: str, lengths: str, inputs: list[int], rounds: int
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not is_malloc_variable(k)}
    env.update(CHILD_ENV)
    command = [sys.executable, "-m", "bench.allocator_ab", "--child", setting, "--model", model,
               "--lengths", lengths, "--inputs", ",".join(map(str, inputs)),
               "--rounds", str(rounds)]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(model: str, lengths: str, inputs: list[int], pairs: int, rounds: int) -> dict[str, Any]:
    """Per length: defaults / kept time (median over pairs of processes), and each one's faults and
    kernel time per round (medians)."""
    runs: dict[str, list[dict[str, Any]]] = {"kept": [], "defaults": []}
    for p in range(pairs):
        for setting in ("kept", "defaults") if p % 2 == 0 else ("defaults", "kept"):
            runs[setting].append(run_child(setting, model, lengths, inputs, rounds))
    out = {}
    for length in lengths.split(","):
        kept = [r[length] for r in runs["kept"]]
        defaults = [r[length] for r in runs["defaults"]]
        out[length] = {
            "defaults_vs_kept": statistics.median(
                d["seconds"] / k["seconds"] for d, k in zip(defaults, kept)
            ),
            **{
                f"{name}_{field}": statistics.median(r[field] for r in rows)
                for name, rows in (("kept", kept), ("defaults", defaults))
                for field in ("faults", "kernel_s", "rss_mb")
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.allocator_ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--lengths", default="short,medium,long")
    parser.add_argument("--inputs", default="256,64,16", help="inputs per round, per length")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["kept", "defaults"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.inputs = [int(n) for n in args.inputs.split(",")]
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return
    result = compare(args.model, args.lengths, args.inputs, args.pairs, args.rounds)
    print(f"{args.model}, {args.pairs} pairs of processes, {args.rounds} rounds each:")
    for length, row in result.items():
        print(
            f"  {length}: glibc defaults / kept {row['defaults_vs_kept']:.3f}x the time; "
            f"page faults a round {row['defaults_faults']:.0f} vs {row['kept_faults']:.0f}, "
            f"kernel CPU {1e3 * row['defaults_kernel_s']:.0f} vs "
            f"{1e3 * row['kept_kernel_s']:.0f} ms, resident after "
            f"{row['defaults_rss_mb']:.0f} vs {row['kept_rss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
