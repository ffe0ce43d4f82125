"""Image embeddings: the worker against its plain recipe, transformers' CLIPModel and
CLIPProcessor on the same model, in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.image_embeddings [--images 256] [--rounds 3]

On a random CLIP with ViT-B/32's vision tower (224 pixels, patches of 32, hidden 768, 12 layers,
projection 512; built here), the same JPEG photos of 640x480 (random noise, so that decoding is
not unusually cheap): images/s through the worker's dispatch (requests of 16 base64 data URIs,
all sent at once, batch size 32), in float32 and with DTYPES=auto (bfloat16 on a CPU that computes
it), and through the recipe (decode with Pillow, the processor on batches of 32,
get_image_features, L2, float32), interleaved rounds, medians, as ratios; and the largest
difference (float32) and the lowest cosine (auto) to the recipe's vectors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from tests import model_factory
from tests.helpers import decode_vectors

from .common import REQUEST_SIZE

BATCH_SIZE = 32
VIT_B_32 = dict(
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    projection_dim=512,
    image_size=224,
    patch_size=32,
)


def photos(count: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        # Smooth noise, as photos are: random blocks, enlarged.
        small = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((640, 480), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.image_embeddings", description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = model_factory.make_clip(Path(folder) / "clip-vit-b-32", **VIT_B_32)
        asyncio.run(compare(path, photos(args.images), args.rounds))


async def compare(path: Path, images: list[bytes], rounds: int) -> None:
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    processor = CLIPProcessor.from_pretrained(path)
    workers = {
        f"worker {dtype}": Worker.from_config(
            load_config({"MODEL_NAMES": str(path), "BATCH_SIZES": str(BATCH_SIZE), "DTYPES": dtype})
        )
        for dtype in ("float32", "auto")
    }
    for worker in workers.values():
        await worker.start()
    uris = ["data:image/jpeg;base64," + base64.b64encode(data).decode() for data in images]
    requests = [uris[i : i + REQUEST_SIZE] for i in range(0, len(uris), REQUEST_SIZE)]

    async def through(worker: Worker) -> np.ndarray:
        replies = await asyncio.gather(
            *(
                worker.request("/v1/embeddings", {"input": chunk, "encoding_format": "base64"})
                for chunk in requests
            )
        )
        return np.concatenate([decode_vectors(reply.body) for reply in replies])

    def through_recipe() -> np.ndarray:
        rows = []
        for start in range(0, len(images), BATCH_SIZE):
            batch = [
                Image.open(io.BytesIO(data)).convert("RGB")
                for data in images[start : start + BATCH_SIZE]
            ]
            with torch.no_grad():
                inputs = processor(images=batch, return_tensors="pt")
                features = model.get_image_features(**inputs)
            rows.append(torch.nn.functional.normalize(features, dim=-1).numpy())
        return np.concatenate(rows)

    async def run(variant: str) -> np.ndarray:
        return through_recipe() if variant == "recipe" else await through(workers[variant])

    variants = [*workers, "recipe"]
    try:
        vectors = {variant: await run(variant) for variant in variants}  # warm-up, and vectors
        worst = float(np.abs(vectors["worker float32"] - vectors["recipe"]).max())
        cosine = float((vectors["worker auto"] * vectors["recipe"]).sum(axis=1).min())
        rates: dict[str, list[float]] = {variant: [] for variant in variants}
        for round_ in range(rounds):
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                started = time.perf_counter()
                await run(variant)
                rates[variant].append(len(images) / (time.perf_counter() - started))
    finally:
        for worker in workers.values():
            await worker.stop()
    median = {variant: statistics.median(rates[variant]) for variant in variants}
    print(f"{len(images)} JPEG images of 640x480, {rounds} rounds (medians)")
    for variant in variants:
        print(f"{variant}: {median[variant]:.1f} images/s")
    for variant in workers:
        print(f"{variant} / recipe: {median[variant] / median['recipe']:.2f}")
    print(f"worker float32, largest vector difference: {worst:.1e}")
    print(f"worker auto, lowest cosine: {cosine:.6f}")


if __name__ == "__main__":
    main()
