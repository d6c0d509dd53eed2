"""The built-in workload: a tiny causal LM and a text sample that ship with autobatch; nothing is downloaded.

The model is built from a config (random weights, fixed seed) with a byte-level tokenizer, saved
with `save_pretrained`, and loaded back like any hub model; tests build the same models for other
architectures.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from autobatch.errors import AutobatchError

logger = logging.getLogger(__name__)

BUILTIN_MODEL_NAME = "tiny-llama-v1"  # bump the suffix when the model changes, so old caches are not reused
SEED = 0
UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [UNK, PAD, BOS, EOS]


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (space is 'Ġ'), the alphabet of byte-level BPE."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # "!".."~", "¡".."¬", "®".."ÿ"
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# Per-architecture config: hidden 64, 2 layers, 4 heads, 2048 positions; generic key names, which every
# config class maps to its own (GPT-2's n_embd, n_layer, n_head, n_positions).
_COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 2048,
}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"intermediate_size": 256},
    "qwen2": {"intermediate_size": 256, "num_key_value_heads": 2},
    "gpt2": {},  # n_inner defaults to 4 × hidden
    "opt": {"ffn_dim": 256, "word_embed_proj_dim": 64},
}


def save_tokenizer(path: str | os.PathLike) -> Path:
    """Save a byte-level tokenizer with no merges: token id = UTF-8 byte value, then 4 special tokens.

    Any text tokenizes (nothing is unknown) with a 260-entry vocabulary, so the embedding stays tiny, and
    for ASCII text tokens = characters, which makes `max_length` easy to reason about. Byte-level rather
    than a character vocabulary because transformers (5.x) loads a qwen2 model's tokenizer as
    Qwen2Tokenizer whatever tokenizer_config.json says, rebuilding a byte-level BPE pipeline around the
    saved vocabulary; this tokenizer is that pipeline, so every architecture gets the same tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_byte_symbols() + SPECIAL_TOKENS)}
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    path = Path(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_model(path: str | os.PathLike, arch: str = "llama", **overrides: Any) -> Path:
    """Save a tiny randomly initialised causal LM of `arch` plus its tokenizer into `path`.

    A few hundred thousand parameters: a training step takes milliseconds on a CPU, yet the model runs
    the same code paths (attention, MLP, LM head, loss) as a full-size one. `overrides` are config keys.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    path = Path(path)
    save_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    values = {
        **_COMMON,
        **ARCHITECTURES[arch],
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }
    config = AutoConfig.for_model(arch, **values)
    with torch.random.fork_rng(devices=[]):  # a fixed seed without disturbing the caller's RNG
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("AUTOBATCH_CACHE") or Path.home() / ".cache" / "autobatch").expanduser()


def is_builtin_model_path(path: str | os.PathLike) -> bool:
    """Whether `path` is where the built-in model is saved (a plan.yaml names it by that path)."""
    return Path(path).expanduser().resolve() == (_cache_root() / BUILTIN_MODEL_NAME).resolve()


def builtin_model_dir() -> Path:
    """The built-in default model: a tiny Llama saved under the cache dir on first use, then reused.

    The cache dir is `$AUTOBATCH_CACHE`, else `~/.cache/autobatch`. The model is written to a temporary
    directory and renamed into place, so concurrent first calls (two ranks, two shells) never see a
    half-written model.
    """
    target = _cache_root() / BUILTIN_MODEL_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the built-in tiny model in %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_MODEL_NAME}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0o700 would survive the rename
        save_tiny_model(tmp, "llama")
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if (target / "config.json").exists():  # another process renamed its copy into place first
                return target
            raise AutobatchError(
                f"{target} exists but holds no model; delete it (or set AUTOBATCH_CACHE) and retry"
            ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def builtin_dataset_path() -> Path:
    """The shipped text sample: ~300 lines of {"text": ...}, 20–600 characters each."""
    return Path(__file__).parent / "assets" / "tiny_text.jsonl"


#: Published shapes of real models (their config.json sizes), for planning in estimate mode without a
#: download: `save_model_shape` writes the config and the byte-level tokenizer, never weights.
PUBLISHED_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "opt-350m": ("opt", {  # facebook/opt-350m
        "vocab_size": 50272, "hidden_size": 1024, "num_hidden_layers": 24, "ffn_dim": 4096,
        "num_attention_heads": 16, "max_position_embeddings": 2048, "word_embed_proj_dim": 512,
        "do_layer_norm_before": False,
    }),
    "tinyllama-1.1b": ("llama", {  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    }),
    "llama-2-7b": ("llama", {  # meta-llama/Llama-2-7b-hf
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    }),
    "qwen2-0.5b": ("qwen2", {  # Qwen/Qwen2-0.5B
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    }),
}


def save_model_shape(path: str | os.PathLike, name: str) -> Path:
    """Write the config of a published model shape (PUBLISHED_SHAPES) and a tokenizer: `--device estimate` plans it.

    No weights are written: the estimate backend builds the model from its config under fake tensors.
    """
    from transformers import AutoConfig

    arch, sizes = PUBLISHED_SHAPES[name]
    path = Path(path)
    save_tokenizer(path)
    AutoConfig.for_model(arch, **sizes).save_pretrained(path)
    return path
