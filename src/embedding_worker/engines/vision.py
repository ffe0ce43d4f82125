"""CLIP-like models (CLIP, SigLIP) on Infinity: the model's own inputs, made by the worker.

Infinity serves a model whose config has a `vision_config` with its `TIMM` replica, which calls the
model's `get_text_features` and `get_image_features` and normalises them: the worker keeps that,
with Infinity's queue, batching and threads. Its pre-processing step (`encode_pre`) is replaced
here, for three reasons:

- it truncates texts to `config.max_length`, which on CLIP and SigLIP configs is transformers'
  generation default of 20 tokens, not the text model's 77 (CLIP) or 64 (SigLIP);
- it pads texts to the longest of the batch, but SigLIP pools the last position and is trained on
  texts padded to the tokenizer's maximum (its model card's `padding="max_length"`): padded to the
  batch, a text's vector would depend on the other texts of its batch;
- it lets the image processor guess where an image's channels are, which it gets wrong for images
  1 or 3 pixels high (their first axis looks like channels); decoded images are always RGB, with
  channels last.

Infinity also applies the dtype only on a GPU: on a CPU its replica stays float32 whatever it is
given. `apply_dtype_on_cpu` casts it, so that DTYPES=auto is bfloat16 on CPUs that compute it
(dtype.py), as for every other embedder.

The replacement makes exactly what the model's processor makes (`processor(text=..., padding=...)`,
`processor(images=...)`) and hands Infinity's next step the features it expects. Images reach it
already processed (`PreparedImage`, made when the request is decoded), and are queued with
Infinity's own image item, past `image_embed`: that takes only Pillow images, bytes or URLs, and
it would fetch a URL itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# model_type values served as image embedders: their processors and feature methods are the ones
# checked here (tests build tiny ones of each).
MODEL_TYPES = ("clip", "siglip")


@dataclass(frozen=True)
class TextLimits:
    """How a CLIP-like model's texts are cut and padded."""

    max_length: int
    padding: str  # "longest" (CLIP) or "max_length" (SigLIP)


def text_limits(replica: Any) -> TextLimits:
    """The text model's real maximum (its position embeddings, or less if the tokenizer says so)
    and its padding."""
    config = replica.model.config
    positions = int(config.text_config.max_position_embeddings)
    tokenizer_max = getattr(replica.processor.tokenizer, "model_max_length", positions)
    max_length = min(positions, int(tokenizer_max))
    padding = "max_length" if config.model_type == "siglip" else "longest"
    return TextLimits(max_length, padding)


def dimensions(replica: Any) -> int:
    """The size of the vectors `get_text_features` and `get_image_features` give."""
    config = replica.model.config
    projection = getattr(config, "projection_dim", None)  # CLIP
    if projection is None:  # SigLIP: the text head's size
        projection = getattr(config.text_config, "projection_size", None)
    return int(projection or config.text_config.hidden_size)


@dataclass(frozen=True)
class PreparedImage:
    """One image as the model takes it: its processor's pixel values (channels, height, width).

    Made when the request is decoded, in the request's thread, so that a large image's pixels are
    freed at once and the batch step only stacks. `height` is what Infinity's queue orders
    images by."""

    pixel_values: Any  # a torch tensor

    @property
    def height(self) -> int:
        return int(self.pixel_values.shape[-2])


def prepare_image(image_processor: Any, image: Any) -> PreparedImage:
    """What the model's processor makes of one decoded RGB image (batches of them only stack)."""
    pixels = image_processor([image], return_tensors="pt", input_data_format="channels_last")[
        "pixel_values"
    ]
    return PreparedImage(pixels[0])


def apply_dtype_on_cpu(replica: Any) -> None:
    """Cast a CPU replica to the dtype it was given (Infinity casts only on CUDA); its forward
    step already casts pixels to the model's dtype and its vectors back to float32."""
    import torch

    wanted = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        replica.engine_args.dtype.value
    )
    if wanted is not None and replica.model.device.type == "cpu":
        replica.model.to(wanted)


def install_preprocess(replica: Any, limits: TextLimits) -> None:
    """Replace the replica's `encode_pre` with the model's own text inputs and the stacked
    pixels of prepared images."""
    import torch

    tokenizer = replica.processor.tokenizer
    device = replica.model.device
    replica.max_length = limits.max_length  # also what Infinity's own length counts use

    def encode_pre(inputs: list[Any]) -> tuple[dict[str, Any], list[bool]]:
        texts = [item for item in inputs if isinstance(item, str)]
        images = [item.pixel_values for item in inputs if isinstance(item, PreparedImage)]
        features: dict[str, Any] = {}
        if texts:
            encoded = tokenizer(
                texts,
                padding=limits.padding,
                truncation=True,
                max_length=limits.max_length,
                return_tensors="pt",
            )
            features.update(encoded)
        if images:
            features["pixel_values"] = torch.stack(images)
        features = {name: value.to(device) for name, value in features.items()}
        return features, [not isinstance(item, str) for item in inputs]

    replica.encode_pre = encode_pre
