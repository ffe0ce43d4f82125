"""Tiny random-initialised models of the transformer families the torch path serves, for the
backends' tests (tests/test_backends.py) and bench.gpu: one builder, `make_family(kind, path)`.

Embedders (sentence-transformers layout, each with its family's usual pooling): BERT with CLS and
with mean pooling, XLM-R, MPNet, RoBERTa, ModernBERT, Gemma3 (mean pooling, then Dense layers, as
google/embeddinggemma), and a T5 encoder (as sentence-t5). Cross-encoders (one label): XLM-R,
DeBERTa-v2, ModernBERT and ELECTRA. Shapes are tiny (hidden 32, 2 layers); the tokenizers are the
model factory's, trained on its corpus, so nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests import model_factory as factory

__all__ = ["CROSS_ENCODERS", "EMBEDDERS", "make_family"]

# name -> pooling of the sentence-transformers files
EMBEDDERS: dict[str, str] = {
    "bert-cls": "cls",
    "bert-mean": "mean",
    "xlm-roberta": "mean",
    "mpnet": "mean",
    "roberta": "mean",
    "modernbert": "mean",
    "gemma3-dense": "mean",
    "t5-encoder": "mean",
}
CROSS_ENCODERS: tuple[str, ...] = (
    "xlm-roberta-cross",
    "deberta-cross",
    "modernbert-cross",
    "electra-cross",
)

HIDDEN = 32
LAYERS = 2
HEADS = 2
MAX_LENGTH = 128


def _tokenizer(family: str) -> Any:
    if family.startswith(("xlm-roberta", "roberta")):
        return factory._xlm_roberta_tokenizer(MAX_LENGTH)
    return factory._bert_tokenizer(MAX_LENGTH)


def _save_tokenizer(family: str, tokenizer: Any, path: Path) -> None:
    tokenizer.save_pretrained(path)
    if family.startswith(("modernbert", "gemma3", "t5")):
        # These models take no token type ids, and their own tokenizers give none.
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["model_input_names"] = ["input_ids", "attention_mask"]
        _write_json(config_path, config)


def _config(family: str, tokenizer: Any, **extra: Any) -> Any:
    import transformers as tf

    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    common: dict[str, Any] = {"vocab_size": vocab, "pad_token_id": pad, **extra}
    base = family.removesuffix("-cross")
    if base in ("bert-cls", "bert-mean"):
        return tf.BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH + 2,
            **common,
        )
    if base in ("xlm-roberta", "roberta"):
        cls = tf.XLMRobertaConfig if base == "xlm-roberta" else tf.RobertaConfig
        return cls(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH + 2 + pad,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **common,
        )
    if base == "mpnet":
        return tf.MPNetConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH + 2 + pad,
            **common,
        )
    if base == "modernbert":
        return tf.ModernBertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH,
            global_attn_every_n_layers=2,
            local_attention=16,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            **common,
        )
    if base == "gemma3-dense":
        return tf.Gemma3TextConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH,
            sliding_window=16,
            use_bidirectional_attention=True,
            **common,
        )
    if base == "t5-encoder":
        return tf.T5Config(
            d_model=HIDDEN,
            d_kv=16,
            d_ff=64,
            num_layers=LAYERS,
            num_heads=HEADS,
            decoder_start_token_id=pad,
            eos_token_id=tokenizer.sep_token_id,
            **common,
        )
    if base == "deberta":
        return tf.DebertaV2Config(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH,
            relative_attention=True,
            position_buckets=32,
            pos_att_type=["p2c", "c2p"],
            **common,
        )
    if base == "electra":
        return tf.ElectraConfig(
            embedding_size=HIDDEN,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH + 2,
            **common,
        )
    raise ValueError(f"unknown family {family!r}")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _add_dense(path: Path, in_features: int, out_features: int, seed: int, index: int) -> None:
    """A sentence-transformers Dense module folder (no bias, identity activation, as
    embeddinggemma's two projections)."""
    torch.manual_seed(seed + index)
    folder = path / f"{index}_Dense"
    folder.mkdir(parents=True, exist_ok=True)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    torch.save({"linear.weight": linear.weight.detach()}, folder / "pytorch_model.bin")
    _write_json(
        folder / "config.json",
        {
            "in_features": in_features,
            "out_features": out_features,
            "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity",
        },
    )


def make_family(family: str, path: Path, *, seed: int = 0) -> Path:
    """A tiny model of `family` (an EMBEDDERS key or a CROSS_ENCODERS entry) saved at `path`."""
    import transformers as tf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(family)
    torch.manual_seed(seed)
    if family in CROSS_ENCODERS:
        config = _config(family, tokenizer, num_labels=1)
        model = tf.AutoModelForSequenceClassification.from_config(config)
        model.config.architectures = [type(model).__name__]
        model.eval().save_pretrained(path)
        _save_tokenizer(family, tokenizer, path)
        return path
    pooling = EMBEDDERS[family]
    config = _config(family, tokenizer)
    if family == "t5-encoder":
        model = tf.T5EncoderModel(config)
    else:
        model = tf.AutoModel.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.eval().save_pretrained(path)
    _save_tokenizer(family, tokenizer, path)
    factory._write_st_files(path, dim=HIDDEN, pooling=pooling, max_seq_length=MAX_LENGTH)
    if family == "gemma3-dense":
        # Transformer, Pooling, Dense(32 -> 48), Dense(48 -> 32), Normalize.
        _add_dense(path, HIDDEN, 48, seed, 2)
        _add_dense(path, 48, HIDDEN, seed, 3)
        modules = json.loads((path / "modules.json").read_text())
        normalize = modules.pop()
        modules += [
            {
                "idx": 2,
                "name": "2",
                "path": "2_Dense",
                "type": "sentence_transformers.models.Dense",
            },
            {
                "idx": 3,
                "name": "3",
                "path": "3_Dense",
                "type": "sentence_transformers.models.Dense",
            },
            {**normalize, "idx": 4, "name": "4", "path": "4_Normalize"},
        ]
        (path / "2_Normalize").rename(path / "4_Normalize")
        _write_json(path / "modules.json", modules)
    return path
