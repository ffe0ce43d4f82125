"""Tiny (or real-size) random-initialised models that load offline.

Every builder writes a model folder with ``save_pretrained`` (plus the
sentence-transformers files where relevant) and returns its ``pathlib.Path``.
Weights are random (``torch.manual_seed(seed)``); tokenizers are trained with the
``tokenizers`` library on the small English corpus below, so nothing is fetched.

Builders:
- ``make_bert_embedder``: BertModel, mean pooling, Normalize (like bge/MiniLM).
- ``make_bert_cross_encoder``: BertForSequenceClassification, one label (reranker).
- ``make_qwen3_embedder``: Qwen3Model, last-token pooling, Normalize, query prompt,
  tokenizer appends ``<|endoftext|>`` (like Qwen/Qwen3-Embedding-*).
- ``make_qwen3_reranker``: Qwen3ForCausalLM with "yes"/"no" tokens (like Qwen3-Reranker).
- ``make_qwen3_single_logit_reranker``: the causal LM converted to
  Qwen3ForSequenceClassification with ``score = W_yes - W_no``.
- ``make_bge_m3``: XLMRobertaModel with a sentencepiece-style (Unigram) tokenizer and the
  ``sparse_linear.pt`` / ``colbert_linear.pt`` heads, in BAAI/bge-m3's layout.
- ``make_clip``: CLIPModel + CLIPProcessor (lower-cased BPE tokenizer with start and end
  tokens, end token also the pad token; a small CLIPImageProcessor), like openai/clip-vit-*.
- ``make_siglip``: SiglipModel + SiglipProcessor, texts padded to the tokenizer's maximum
  (like google/siglip-*).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "CORPUS",
    "QWEN3_QUERY_PROMPT",
    "RERANKER_PREFIX",
    "RERANKER_SUFFIX",
    "make_bert_embedder",
    "make_bert_cross_encoder",
    "make_qwen3_embedder",
    "make_qwen3_reranker",
    "make_qwen3_single_logit_reranker",
    "make_clip",
    "make_siglip",
    "make_bge_m3",
    "yes_no_token_ids",
    "format_reranker_input",
]

QWEN3_TASK = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_QUERY_PROMPT = f"Instruct: {QWEN3_TASK}\nQuery:"
RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".'
    "<|im_end|>\n<|im_start|>user\n"
)
RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

ENDOFTEXT = "<|endoftext|>"
QWEN_SPECIAL = [ENDOFTEXT, "<|im_start|>", "<|im_end|>"]
QWEN_THINK = ["<think>", "</think>"]  # added tokens, not "special" (as in Qwen3)
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Qwen2 pre-tokenisation regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX)
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# --------------------------------------------------------------------------- corpus

_SENTENCES = """\
The quick brown fox jumps over the lazy dog.
A web search engine ranks documents by how well they answer the query.
Paris is the capital of France and a popular destination for tourists.
Berlin, Madrid, Rome and Lisbon are capital cities in Europe.
Water boils at one hundred degrees Celsius at sea level.
Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.
The mitochondria is often called the powerhouse of the cell.
Machine learning models learn patterns from large amounts of data.
Neural networks are trained with gradient descent and backpropagation.
Text embeddings map sentences to vectors so that similar meanings are close together.
A reranker scores each document against the query and sorts them by relevance.
Cosine similarity measures the angle between two vectors.
Python is a programming language that is easy to read and write.
The server returned an error because the request was too large.
Please restart the worker after you change the configuration.
How do I install the package on a machine without internet access?
What is the best way to cook rice on the stove?
Boil two cups of water, add one cup of rice, cover and simmer for eighteen minutes.
Bake the bread in a hot oven until the crust is golden brown.
Fresh vegetables, olive oil, garlic and lemon make a simple healthy salad.
Drink enough water every day and get at least seven hours of sleep.
Regular exercise improves heart health and reduces stress.
The doctor recommended rest, fluids and a mild pain reliever.
The football match ended in a draw after extra time.
She won the tennis tournament without losing a single set.
The marathon runners crossed the finish line in under three hours.
Stock markets fell sharply after the central bank raised interest rates.
Inflation measures how quickly prices rise over time.
A budget helps families plan their spending and saving.
The Roman Empire lasted for centuries before it finally collapsed.
World War II ended in 1945 after six years of fighting.
The printing press changed how knowledge spread across Europe.
Mount Everest is the highest mountain on Earth at 8849 meters.
The Amazon river flows through Brazil into the Atlantic Ocean.
Deserts receive very little rain, yet many animals live there.
Climate change is causing glaciers to melt and sea levels to rise.
Solar panels and wind turbines produce renewable electricity.
Electric cars are becoming cheaper and their batteries last longer.
The train to the airport leaves every fifteen minutes from platform two.
Book your flight early to get a cheaper ticket.
The hotel room had a view of the sea and a small balcony.
Our museum tour starts at ten o'clock in the morning.
Children learn languages quickly when they hear them every day.
The library is open from nine to five on weekdays.
Students must submit their essays before Friday at noon.
The teacher explained the theorem with a simple drawing.
Mathematics studies numbers, shapes, patterns and change.
The sum of the angles of a triangle is one hundred and eighty degrees.
Prime numbers are divisible only by one and themselves: 2, 3, 5, 7, 11, 13.
Light travels at about 300,000 kilometers per second.
The moon orbits the Earth roughly once every 27 days.
Jupiter is the largest planet in our solar system.
Astronauts on the space station see sixteen sunrises each day.
The database stores user records in tables with rows and columns.
An index makes queries faster but uses more disk space.
The function returns a list of numbers sorted in ascending order.
Use a virtual environment to keep project dependencies separate.
Tests should be fast, deterministic and independent of the network.
The GPU has more memory than the CPU cache but it is slower to reach.
Batching many short requests together improves throughput.
Latency is the time between sending a request and receiving the answer.
The model was quantized to int8 to reduce memory use.
Tokenizers split text into words, subwords or bytes.
Dogs are loyal animals and cats are independent.
The garden was full of roses, tulips and sunflowers in summer.
Birds migrate south in autumn and return in spring.
It rained all night, so the streets were wet in the morning.
Snow fell quietly over the mountains during the winter.
The concert was loud, colorful and full of energy.
He plays the piano and the guitar, and he sings in a choir.
The novel tells the story of a young girl who travels across the ocean.
The film won three awards, including best director.
Coffee contains caffeine, which helps people stay awake.
Green tea is popular in China and Japan.
My phone battery dies quickly when the screen is bright.
Turn the computer off and on again to fix the problem.
Email the report to the manager by the end of the week.
The company hired twenty new engineers this year.
Customers can return products within thirty days for a full refund.
The shop sells shoes, shirts, jackets and hats.
Who wrote the theory of relativity?
Albert Einstein published the theory of general relativity in 1915.
Why is the sky blue during the day?
Sunlight is scattered by the air, and blue light scatters the most.
When did humans first land on the moon?
Apollo 11 landed on the moon in July 1969.
Where do penguins live?
Most penguins live in the Southern Hemisphere, especially in Antarctica.
How many legs does a spider have?
A spider has eight legs and most spiders have eight eyes.
Is it safe to swim after eating?
Yes, swimming after a meal is generally safe.
Can dogs eat chocolate?
No, chocolate is toxic to dogs.
Does the answer meet the requirements of the query?
The answer can only be yes or no.
What's the weather like today? It's sunny, warm and dry.
I'm learning to code, and I'd like to build a small website.
They've moved to a new house near the river.
We'll meet at the cafe at half past six.
"""

_WORDS = {
    "subjects": [
        "the engineer",
        "a student",
        "my neighbor",
        "the scientist",
        "our team",
        "the children",
        "a farmer",
        "the pilot",
        "the doctor",
        "her brother",
        "the small robot",
        "an old man",
        "the teacher",
        "a young woman",
        "the chef",
    ],
    "verbs": [
        "reads",
        "writes",
        "builds",
        "finds",
        "explains",
        "cooks",
        "paints",
        "repairs",
        "sells",
        "studies",
        "measures",
        "describes",
        "carries",
        "watches",
    ],
    "objects": [
        "a long book",
        "the new bridge",
        "a fresh loaf of bread",
        "the broken engine",
        "an interesting article",
        "the weather report",
        "a map of the city",
        "the results of the experiment",
        "a red bicycle",
        "the history of music",
        "a wooden table",
        "the latest news",
        "a cup of hot soup",
        "the night sky",
    ],
    "places": [
        "at home",
        "in the park",
        "at school",
        "in the laboratory",
        "near the station",
        "in the kitchen",
        "on the beach",
        "in the office",
        "at the market",
        "in London",
        "in Tokyo",
        "in New York",
        "on the farm",
        "in the garden",
    ],
    "times": [
        "every morning",
        "on Sunday",
        "after lunch",
        "at night",
        "in winter",
        "yesterday",
        "last year",
        "today",
        "before dinner",
        "twice a week",
    ],
}


def _generated_sentences() -> Iterator[str]:
    w = _WORDS
    n = 0
    for i, s in enumerate(w["subjects"]):
        for j, v in enumerate(w["verbs"]):
            o = w["objects"][(i * 3 + j) % len(w["objects"])]
            p = w["places"][(i + 2 * j) % len(w["places"])]
            t = w["times"][(i * 5 + j) % len(w["times"])]
            n += 1
            yield f"{s[0].upper()}{s[1:]} {v} {o} {p} {t}."
            if n % 3 == 0:
                yield f"Why does {s} {v[:-1] if v.endswith('s') else v} {o}?"
            if n % 7 == 0:
                yield f"{t.capitalize()}, {s} {v} {o}: {n} times, {n * 17 % 1000} pages."


def _alphabet_lines() -> Iterator[str]:
    """Every printable ASCII character, alone and inside a word (no [UNK] for plain ASCII)."""
    chars = [chr(c) for c in range(33, 127)]
    yield " ".join(chars)
    yield " ".join("a" + c + "a" for c in chars if c.isalnum())


def _template_lines() -> Iterator[str]:
    queries = ["What is the capital of China?", "Explain gravity", "how to cook rice"]
    docs = [
        "The capital of China is Beijing.",
        "Gravity is a force that attracts two bodies towards each other.",
        "Rinse the rice, add water and simmer.",
    ]
    for q, d in zip(queries, docs):
        yield f"Instruct: {QWEN3_TASK}\nQuery:{q}"
        yield (
            f"{RERANKER_PREFIX}<Instruct>: {QWEN3_TASK}\n<Query>: {q}\n<Document>: {d}"
            f"{RERANKER_SUFFIX}yes"
        )
        yield f"{RERANKER_PREFIX}<Instruct>: {QWEN3_TASK}\n<Query>: {q}\n<Document>: {docs[0]}"
        yield f"{RERANKER_SUFFIX}no"


CORPUS: list[str] = (
    _SENTENCES.splitlines()
    + list(_generated_sentences())
    + list(_template_lines())
    + list(_alphabet_lines()) * 2
    # make sure "yes" / "no" (no leading space) become single BPE tokens
    + ["yes", "no", "Yes", "No", "yes.", "no."] * 50
)

# --------------------------------------------------------------------------- tokenizers


@functools.cache
def _wordpiece_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIAL, min_frequency=1, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok.to_str()


def _bert_tokenizer(model_max_length: int):
    from tokenizers import Tokenizer
    from transformers import BertTokenizerFast

    tok = Tokenizer.from_str(_wordpiece_json(2000))
    return BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


@functools.cache
def _bpe_json(vocab_size: int, append_eos: bool) -> str:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Added tokens come after the learned vocabulary, as in Qwen (151643 = <|endoftext|>).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_THINK])
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if append_eos:
        eos_id = tok.token_to_id(ENDOFTEXT)
        tok.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"$A:0 {ENDOFTEXT}:0",
                    pair=f"$A:0 {ENDOFTEXT}:0 $B:1 {ENDOFTEXT}:1",
                    special_tokens=[(ENDOFTEXT, eos_id)],
                ),
            ]
        )
    else:
        tok.post_processor = byte_level
    for word in ("yes", "no"):
        if tok.token_to_id(word) is None:  # pragma: no cover - corpus guarantees it
            raise RuntimeError(f"BPE vocabulary lacks the single token {word!r}")
    return tok.to_str()


# XLM-RoBERTa's special tokens at its ids: <s> 0, <pad> 1, </s> 2, <unk> 3; <mask> comes last.
XLMR_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]


@functools.cache
def _unigram_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=XLMR_SPECIAL, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tok.to_str()


def _xlm_roberta_tokenizer(model_max_length: int):
    from tokenizers import Tokenizer
    from transformers import XLMRobertaTokenizerFast

    return XLMRobertaTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_unigram_json(1500)),
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=model_max_length,
    )


CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"


@functools.cache
def _clip_bpe_json(vocab_size: int) -> str:
    """A CLIP-like BPE: lower-cased, whitespace-split, start and end tokens around every text;
    the special tokens come last in the vocabulary, as in CLIP."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=CLIP_END, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        end_of_word_suffix="</w>",
        initial_alphabet=[chr(c) for c in range(32, 127)],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in (CLIP_START, CLIP_END)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_START} $A {CLIP_END}",
        pair=f"{CLIP_START} $A {CLIP_END} $B {CLIP_END}",
        special_tokens=[(t, tok.token_to_id(t)) for t in (CLIP_START, CLIP_END)],
    )
    return tok.to_str()


def _clip_tokenizer(model_max_length: int, pad_token: str = CLIP_END):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_clip_bpe_json(1000)),
        bos_token=CLIP_START,
        eos_token=CLIP_END,
        unk_token=CLIP_END,
        pad_token=pad_token,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def _qwen_tokenizer(*, append_eos: bool, model_max_length: int):
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer.from_str(_bpe_json(2000, append_eos))
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )


def yes_no_token_ids(tokenizer) -> tuple[int, int]:
    """(id of "yes", id of "no") as single tokens; raises if either is missing."""
    ids = []
    for word in ("yes", "no"):
        tid = tokenizer.convert_tokens_to_ids(word)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no single token {word!r}")
        ids.append(int(tid))
    return ids[0], ids[1]


def format_reranker_input(query: str, document: str, instruction: str = QWEN3_TASK) -> str:
    """The official Qwen3-Reranker prompt for one (query, document) pair."""
    return (
        f"{RERANKER_PREFIX}<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
        f"{RERANKER_SUFFIX}"
    )


# --------------------------------------------------------------------------- helpers


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _versions() -> dict:
    import sentence_transformers
    import transformers

    return {
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
    }


def _write_st_files(
    path: Path,
    *,
    dim: int,
    pooling: str,
    max_seq_length: int,
    do_lower_case: bool = False,
    prompts: dict | None = None,
    normalize: bool = True,
) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ][: 3 if normalize else 2]
    _write_json(path / "modules.json", modules)
    _write_json(
        path / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": pooling == "lasttoken",
            "include_prompt": True,
        },
    )
    if normalize:
        (path / "2_Normalize").mkdir(exist_ok=True)
    _write_json(
        path / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case},
    )
    _write_json(
        path / "config_sentence_transformers.json",
        {
            "__version__": _versions(),
            "prompts": prompts or {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


@contextlib.contextmanager
def _skip_init(enabled: bool):
    """Skip random init (weights are overwritten right after)."""
    if not enabled:
        yield
        return
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover
        yield
        return
    with no_init_weights():
        yield


def _bert_config(
    tokenizer,
    *,
    hidden_size,
    num_layers,
    num_heads,
    intermediate_size,
    max_position,
    vocab_size,
    **extra,
):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _qwen3_config(
    tokenizer,
    *,
    hidden_size,
    num_layers,
    num_heads,
    num_kv_heads,
    head_dim,
    intermediate_size,
    max_position,
    vocab_size,
    tie_word_embeddings,
    **extra,
):
    from transformers import Qwen3Config

    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return Qwen3Config(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        **extra,
    )


# --------------------------------------------------------------------------- builders


def make_bert_embedder(
    path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position: int = 512,
    max_seq_length: int = 128,
    vocab_size: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    pooling: str = "mean",
) -> Path:
    """BertModel + WordPiece tokenizer, ST layout: Transformer, mean Pooling (or ``pooling``:
    "cls", "lasttoken"), Normalize (without it with ``normalize=False``, like dot-product models
    such as msmarco-distilbert-base-tas-b)."""
    from transformers import BertModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer(max_position)
    config = _bert_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position=max_position,
        vocab_size=vocab_size,
        architectures=["BertModel"],
    )
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    _write_st_files(
        path,
        dim=hidden_size,
        pooling=pooling,
        max_seq_length=max_seq_length,
        do_lower_case=False,
        normalize=normalize,
    )
    return path


def make_bert_cross_encoder(
    path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position: int = 512,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """BertForSequenceClassification with one label (an Infinity / ST CrossEncoder reranker)."""
    from transformers import BertForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer(max_position)
    config = _bert_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position=max_position,
        vocab_size=vocab_size,
        num_labels=1,
        architectures=["BertForSequenceClassification"],
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_bert_classifier(
    path,
    *,
    labels: tuple[str, ...] = ("negative", "neutral", "positive"),
    multi_label: bool = False,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position: int = 512,
    seed: int = 0,
) -> Path:
    """BertForSequenceClassification with several labels (a sentiment or routing classifier);
    `multi_label` marks it problem_type multi_label_classification (sigmoid per label)."""
    from transformers import BertForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer(max_position)
    extra = {"problem_type": "multi_label_classification"} if multi_label else {}
    config = _bert_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position=max_position,
        vocab_size=None,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        architectures=["BertForSequenceClassification"],
        **extra,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_qwen3_embedder(
    path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    intermediate_size: int = 64,
    max_position: int = 32768,
    max_seq_length: int = 8192,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Qwen3Model in the Qwen3-Embedding ST layout (last-token pooling, Normalize, prompts).

    The tokenizer appends <|endoftext|> to every sequence and pads on the left.
    """
    from transformers import Qwen3Model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer(append_eos=True, model_max_length=max_position)
    config = _qwen3_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position=max_position,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen3Model"],
    )
    torch.manual_seed(seed)
    Qwen3Model(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    _write_st_files(
        path,
        dim=hidden_size,
        pooling="lasttoken",
        max_seq_length=max_seq_length,
        prompts={"query": QWEN3_QUERY_PROMPT, "document": ""},
    )
    return path


def make_qwen3_reranker(
    path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    intermediate_size: int = 64,
    max_position: int = 32768,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Qwen3ForCausalLM like Qwen3-Reranker: "yes"/"no" single tokens, left padding, no eos
    appended."""
    from transformers import Qwen3ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer(append_eos=False, model_max_length=max_position)
    config = _qwen3_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position=max_position,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_qwen3_single_logit_reranker(causal_lm_path, path) -> Path:
    """Convert a Qwen3ForCausalLM reranker to Qwen3ForSequenceClassification, one label.

    score.weight = lm_head.weight[yes] - lm_head.weight[no], so the logit equals
    logit_yes - logit_no of the causal LM (sigmoid of it = the official score).
    """
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        Qwen3ForCausalLM,
        Qwen3ForSequenceClassification,
    )

    causal_lm_path, path = Path(causal_lm_path), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_path)
    yes_id, no_id = yes_no_token_ids(tokenizer)
    causal = Qwen3ForCausalLM.from_pretrained(causal_lm_path, dtype=torch.float32).eval()

    config = AutoConfig.from_pretrained(causal_lm_path)
    config.architectures = ["Qwen3ForSequenceClassification"]
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.tie_word_embeddings = False
    with _skip_init(True):
        seq = Qwen3ForSequenceClassification(config)
    seq.model.load_state_dict(causal.model.state_dict(), strict=True)
    with torch.no_grad():
        lm = causal.lm_head.weight
        seq.score.weight.copy_((lm[yes_id] - lm[no_id]).unsqueeze(0))
    seq.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_bge_m3(
    path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_length: int = 512,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """XLMRobertaModel in BAAI/bge-m3's layout: the sentence-transformers files (CLS pooling,
    Normalize), ``sparse_linear.pt`` (Linear(hidden, 1)) and ``colbert_linear.pt``
    (Linear(hidden, hidden)) state dicts beside the weights. Positions are ``max_length + 2``, as
    XLM-RoBERTa counts them (8194 for bge-m3's 8192 tokens)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _xlm_roberta_tokenizer(max_length)
    config = XLMRobertaConfig(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_length + 2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        architectures=["XLMRobertaModel"],
    )
    torch.manual_seed(seed)
    XLMRobertaModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(torch.nn.Linear(hidden_size, 1).state_dict(), path / "sparse_linear.pt")
    torch.save(torch.nn.Linear(hidden_size, hidden_size).state_dict(), path / "colbert_linear.pt")
    _write_st_files(path, dim=hidden_size, pooling="cls", max_seq_length=max_length)
    return path


def _make_image_text_model(
    path,
    *,
    family: str,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position: int,
    image_size: int,
    patch_size: int,
    seed: int,
    **config_extra,
) -> Path:
    """A CLIP-like model of `family` ("clip" or "siglip"): its Model class on text and vision
    configs of one shape, saved with its Processor (the CLIP-like BPE tokenizer and the family's
    image processor at `image_size`)."""
    import transformers

    prefix = {"clip": "CLIP", "siglip": "Siglip"}[family]

    def named(suffix: str):
        return getattr(transformers, prefix + suffix)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer(max_position)
    tower = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
    )
    text = named("TextConfig")(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **tower,
    )
    vision = named("VisionConfig")(image_size=image_size, patch_size=patch_size, **tower)
    config = named("Config")(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        architectures=[prefix + "Model"],
        **config_extra,
    )
    torch.manual_seed(seed)
    named("Model")(config).eval().save_pretrained(path)
    if family == "clip":  # resized on the shortest edge, then centre-cropped
        sizes = {
            "size": {"shortest_edge": image_size},
            "crop_size": {"height": image_size, "width": image_size},
        }
    else:  # resized to a square
        sizes = {"size": {"height": image_size, "width": image_size}}
    images = named("ImageProcessor")(**sizes)
    named("Processor")(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def make_clip(
    path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    projection_dim: int = 24,
    max_position: int = 77,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> Path:
    """CLIPModel + CLIPProcessor: texts pooled at their end token, images resized to
    `image_size` on the shortest edge and centre-cropped (CLIPImageProcessor's defaults
    otherwise: bicubic, the CLIP mean and std)."""
    return _make_image_text_model(
        path,
        family="clip",
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position=max_position,
        image_size=image_size,
        patch_size=patch_size,
        seed=seed,
        projection_dim=projection_dim,
    )


def make_siglip(
    path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position: int = 16,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> Path:
    """SiglipModel + SiglipProcessor: texts pooled at the last position, so padded to the
    tokenizer's maximum (`max_position`) as SigLIP is used; images resized to `image_size`
    square, mean and std 0.5."""
    return _make_image_text_model(
        path,
        family="siglip",
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position=max_position,
        image_size=image_size,
        patch_size=patch_size,
        seed=seed,
    )
