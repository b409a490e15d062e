"""Rollout engines: prompts in; sampled token ids, the sampling distribution's per-token
statistics and, on request, the model cache out.

An engine is any callable with `HFGenerate.__call__`'s signature that returns a `Generation`.
`HFGenerate` runs transformers' `generate` and reduces each decoding step's distribution to
the three numbers the rollout keeps (log-prob of the sampled token, entropy, self-certainty),
so no second forward over the sampled sequences is needed. docs/training.md (Rollout engines) says
how an external engine such as vLLM plugs in.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._dynamo.exc import TorchDynamoException
from torch._inductor.exc import CppCompileError
from transformers import (
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
)

from covo.rollout.context_cache import cache_of, with_cache

log = logging.getLogger(__name__)

STAT_NAMES = ("logprobs", "entropy", "self_certainty")


@dataclass
class Generation:
    """What an engine returns for R = prompts x samples rows.

    `sequences` [R, P+G]: left-padded prompts, then the sampled tokens (padding after EOS).
    `prompt_mask` [R, P]: 1 on prompt tokens. `stats[name]` [R, G] float32 for each of
    `STAT_NAMES`, or None when the engine does not compute them (the rollout then runs a
    forward). `cache`: a model cache whose column c holds the keys and values of
    `sequences[:, c]` for every column, or None.
    """

    sequences: Tensor
    prompt_mask: Tensor
    stats: dict[str, Tensor] | None = None
    cache: object | None = None

    @property
    def prompt_len(self) -> int:
        return self.prompt_mask.shape[1]

    @property
    def responses(self) -> Tensor:
        """[R, G] the sampled tokens."""
        return self.sequences[:, self.prompt_len :]


def distribution_stats(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Log-softmax of `logits` [..., V] at `temperature` (none when it is 0: greedy), the
    entropy and the self-certainty KL(uniform || p) of that distribution."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    self_certainty = -logp.mean(-1) - math.log(logp.shape[-1])
    return logp, entropy, self_certainty


class SamplingStatistics(LogitsProcessor):
    """Reduces every decoding step's next-token distribution to per-row numbers.

    transformers applies the processors it is given before its sampling warpers, so this one
    sees the raw logits and applies the temperature itself (top-p, like the training loss,
    is not applied: the statistics are those of the temperature-scaled distribution). The
    sampled token is known one step later, so each step's log-softmax is kept until the next
    call (or `finish`) reads the chosen token's entry.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.reset()

    def reset(self) -> None:
        self.columns: dict[str, list[Tensor]] = {name: [] for name in STAT_NAMES}
        self.pending: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.pending is not None:
            self._take(input_ids[:, -1])
        logp, entropy, self_certainty = distribution_stats(scores, self.temperature)
        self.columns["entropy"].append(entropy)
        self.columns["self_certainty"].append(self_certainty)
        self.pending = logp
        return scores

    def _take(self, tokens: Tensor) -> None:
        self.columns["logprobs"].append(self.pending.gather(-1, tokens[:, None]).squeeze(-1))
        self.pending = None

    def finish(self, generated: Tensor) -> dict[str, Tensor]:
        """The statistics [R, G] of the `generated` tokens [R, G] (decoding may have run
        steps that were undone: only the first G are kept)."""
        steps = generated.shape[1]
        if self.pending is not None and len(self.columns["logprobs"]) < steps:
            self._take(generated[:, len(self.columns["logprobs"])])
        stats = {}
        for name, columns in self.columns.items():
            kept = columns[:steps]
            stats[name] = torch.stack(kept, 1) if kept else generated.new_zeros(generated.shape)
        return stats


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


# every logits processor transformers builds from a GenerationConfig, set to do nothing: the
# sampled distribution is softmax(logits / temperature), cut by top-p (and top-k) only
NEUTRAL_PROCESSORS = dict(
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    min_length=0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    guidance_scale=1.0,
    renormalize_logits=False,
    remove_invalid_values=False,
    num_beams=1,
    length_penalty=1.0,
)


def generation_config(
    model,
    tokenizer,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> GenerationConfig:
    """The complete sampling settings of a `generate` call: the run's own (greedy when
    `temperature` is 0), every other processor neutral, and the special tokens of the
    tokenizer and the model. Nothing comes from `model.generation_config` but its EOS ids
    (`generate_with` keeps transformers from merging the rest in)."""
    sampling = temperature > 0
    config = GenerationConfig(
        do_sample=sampling,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=sorted(eos_token_ids(model, tokenizer)),
        use_cache=True,
        return_dict_in_generate=True,
        **NEUTRAL_PROCESSORS,
    )
    if sampling:  # greedy builds no warpers: leaving them unset keeps transformers quiet
        config.temperature, config.top_p, config.top_k = temperature, top_p, top_k
    return config


@contextlib.contextmanager
def without_model_defaults(model):
    """`generate` merges `model.generation_config` into every field the passed config leaves
    unset (None), and None is the neutral value of several processors (suppress_tokens,
    bad_words_ids, sequence_bias, forced_eos_token_id, ...): the model's defaults are blanked
    for the call (on every Hugging Face model inside `model`: peft and FSDP wrap them)."""
    models = [m for m in model.modules() if isinstance(m, GenerationMixin)]
    saved = [m.generation_config for m in models]
    try:
        for m in models:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, config in zip(models, saved):
            m.generation_config = config


def generate_with(model, config: GenerationConfig, **kwargs):
    """`model.generate` under `config` alone (`without_model_defaults`)."""
    with without_model_defaults(model):
        return model.generate(generation_config=config, **kwargs)


# what the static cache + compile path may raise where torch or the model cannot do it: a
# compile failure (dynamo or inductor, a missing C++ compiler) or a cache layer a model lacks
FALLBACK_ERRORS = (TorchDynamoException, CppCompileError, NotImplementedError)


class HFGenerate:
    """transformers' `generate`, with the sampling statistics collected while decoding.

    `cache="dynamic"` grows the keys and values step by step; `cache="static"` preallocates
    them (fixed shapes), and with `compile=true` the decoding step is compiled (CUDA graphs on
    GPUs). The static cache is kept between calls and reused while the rows and the length
    bucket (prompt + new tokens, rounded up to a multiple of `length_bucket`) stay the same,
    so the compiled step sees the same shapes rollout after rollout. Where torch or the model
    cannot decode that way (`FALLBACK_ERRORS`), one warning says so, decoding goes on with the
    dynamic cache and `fell_back` is set (logged as `rollout/engine_fallback`).
    """

    def __init__(self, cache: str = "dynamic", compile: bool = False, length_bucket: int = 256):
        if cache not in ("dynamic", "static"):
            raise ValueError(f"rollout.engine.cache must be dynamic or static, got {cache!r}")
        if not isinstance(length_bucket, int) or length_bucket < 1:
            raise ValueError(
                f"rollout.engine.length_bucket must be an integer >= 1, got {length_bucket!r}"
            )
        self.cache = cache
        self.compile = compile
        self.length_bucket = length_bucket
        self.fell_back = False
        self.static: tuple[tuple, object] | None = None  # (rows, length, dtype, device), cache
        self.compile_config = None
        if compile:
            from transformers import CompileConfig

            self.compile_config = CompileConfig(fullgraph=False)
            # compiling on CPU is opt-in in transformers; ask for it on every device
            self.compile_config._compile_all_devices = True

    @property
    def metrics(self) -> dict[str, float]:
        return {"rollout/engine_fallback": float(self.fell_back)}

    def static_cache(self, model, rows: int, longest: int):
        """The kept static cache, emptied, when it fits `rows` x `longest` in its bucket; else
        a new one that replaces it. `longest` = prompt + max new tokens: one slot more than
        decoding fills, for the last sampled token's keys (`complete_cache`)."""
        from transformers import StaticCache

        length = -(-longest // self.length_bucket) * self.length_bucket
        parameter = next(model.parameters())
        key = (rows, length, parameter.dtype, parameter.device)
        if self.static is not None and self.static[0] == key:
            self.static[1].reset()
        else:
            self.static = None  # the old cache's memory goes before the new one's
            self.static = (key, StaticCache(config=model.config, max_cache_len=length))
        return self.static[1]

    @torch.no_grad()
    def __call__(
        self,
        model,
        tokenizer,
        encoded: dict[str, Tensor],
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        synced: bool = False,
        keep_cache: bool = False,
        with_stats: bool = True,
    ) -> Generation:
        statistics = SamplingStatistics(temperature) if with_stats else None
        kwargs = dict(
            **encoded,
            synced_gpus=synced,
            logits_processor=LogitsProcessorList([statistics] if statistics else []),
        )
        config = generation_config(
            model, tokenizer, max_new_tokens, num_samples, temperature, top_p
        )
        out = self._generate(model, config, kwargs, encoded["input_ids"].shape[1] + max_new_tokens)
        prompt_mask = encoded["attention_mask"].repeat_interleave(num_samples, dim=0)
        generation = Generation(out.sequences, prompt_mask)
        if statistics:
            generation.stats = statistics.finish(generation.responses)
        if keep_cache:
            cache = complete_cache(model, cache_of(out), out.sequences, prompt_mask)
            if self.static is not None and cache is self.static[1]:
                # the next call empties the kept cache: the caller gets the keys and values
                cache = copied_cache(cache, out.sequences.shape[1])
            generation.cache = cache
        return generation

    def _generate(self, model, config: GenerationConfig, kwargs: dict, longest: int):
        if self.cache == "dynamic" or self.fell_back:
            return generate_with(model, config, **kwargs)
        config.compile_config = self.compile_config
        config.disable_compile = not self.compile
        rows = len(kwargs["input_ids"]) * config.num_return_sequences
        try:
            cache = self.static_cache(model, rows, longest)
            return generate_with(model, config, **with_cache(cache), **kwargs)
        except FALLBACK_ERRORS as error:
            self.fell_back, self.static = True, None
            log.warning(
                "rollout.engine: %s cache%s failed here (%s: %s); decoding with the dynamic"
                " cache from now on (rollout/engine_fallback = 1)",
                self.cache,
                " + compile" if self.compile else "",
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
            )
            for statistics in kwargs["logits_processor"]:
                statistics.reset()  # of the failed attempt
            config.compile_config, config.disable_compile = None, True
            return generate_with(model, config, **kwargs)


def copied_cache(cache, length: int) -> DynamicCache:
    """A dynamic cache holding a copy of the first `length` columns of `cache`'s layers."""
    return DynamicCache(
        [
            (layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone())
            for layer in cache.layers
        ]
    )


def position_ids_from(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def feed_last_token(model, cache, sequences: Tensor, prompt_mask: Tensor, width: int):
    """One single-token step of `sequences`' last token into `cache`, the attention mask
    `width` columns wide (the prompt's mask, then ones)."""
    generated = width - prompt_mask.shape[1]
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(sequences), generated)], 1)
    model(
        input_ids=sequences[:, -1:],
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask)[:, -1:],
        **with_cache(cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return cache


def complete_cache(model, cache, sequences: Tensor, prompt_mask: Tensor):
    """`cache` holding every column of `sequences`: decoding never feeds the last sampled
    token, so its keys and values come from one more single-token step."""
    if cache is None or cache.get_seq_length() >= sequences.shape[1]:
        return cache
    return feed_last_token(model, cache, sequences, prompt_mask, sequences.shape[1])
