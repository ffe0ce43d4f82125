"""Image embeddings: the worker against its plain recipe, transformers' CLIPModel and
CLIPProcessor on the same model, in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.images [--images 256] [--rounds 3]

On a random CLIP with ViT-B/32's vision tower (224 pixels, patches of 32, hidden 768, 12 layers,
projection 512; built here), the same JPEG photos of 640x480 (random noise, so that decoding is
not unusually cheap): images/s through the worker's dispatch (requests of 16 base64 data URIs,
all sent at once, batch size 32) and through the recipe (decode with Pillow, the processor on
batches of 32, get_image_features, L2), interleaved rounds, medians, as a ratio; and the largest
difference between the two's vectors.
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

BATCH_SIZE = 32
REQUEST_SIZE = 16
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
    parser = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__)
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
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": str(path), "BATCH_SIZES": str(BATCH_SIZE), "DTYPES": "float32"})
    )
    await worker.start()
    uris = ["data:image/jpeg;base64," + base64.b64encode(data).decode() for data in images]
    requests = [uris[i : i + REQUEST_SIZE] for i in range(0, len(uris), REQUEST_SIZE)]

    async def through_worker() -> np.ndarray:
        replies = await asyncio.gather(
            *(
                worker.call("/v1/embeddings", {"input": chunk, "encoding_format": "base64"})
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

    try:
        ours, theirs = await through_worker(), through_recipe()  # warm-up, and the vectors
        worst = float(np.abs(ours - theirs).max())
        rates: dict[str, list[float]] = {"worker": [], "recipe": []}
        for round_ in range(rounds):
            order = ["worker", "recipe"] if round_ % 2 == 0 else ["recipe", "worker"]
            for variant in order:
                started = time.perf_counter()
                if variant == "worker":
                    await through_worker()
                else:
                    through_recipe()
                rates[variant].append(len(images) / (time.perf_counter() - started))
    finally:
        await worker.stop()
    worker_rate, recipe_rate = (statistics.median(rates[k]) for k in ("worker", "recipe"))
    print(f"{len(images)} JPEG images of 640x480, {rounds} rounds (medians)")
    print(f"worker {worker_rate:.1f} images/s, recipe {recipe_rate:.1f} images/s")
    print(f"worker / recipe: {worker_rate / recipe_rate:.2f}")
    print(f"largest vector difference: {worst:.1e}")


if __name__ == "__main__":
    main()
