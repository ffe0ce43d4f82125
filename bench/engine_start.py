"""The raw Infinity engine's own cold start, the baseline of the worker's: load, start, one answer, stop.

Run as a child process by bench/run.py with the same EngineArgs the worker passes:
`python bench/engine_start.py MODEL_DIR DTYPE`. Prints "first answer" when the vector is back.
"""

from __future__ import annotations

import asyncio
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")


async def main(model: str, dtype: str) -> None:
    from infinity_emb import AsyncEngineArray, EngineArgs

    args = EngineArgs(
        model_name_or_path=model,
        batch_size=32,
        dtype=dtype,
        engine="torch",
        trust_remote_code=False,
        bettertransformer=False,
        model_warmup=False,
        compile=False,
        lengths_via_tokenize=False,
        vector_disk_cache_path="",
    )
    array = AsyncEngineArray.from_args([args])
    await array.astart()
    vectors, _ = await array[args.served_model_name].embed(sentences=["hello world"])
    print(f"first answer: {len(vectors[0])} dims", flush=True)
    await array.astop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
