"""Rollout engines: prompts in; sampled token ids, the sampling distribution's per-token
statistics and, on request, the model cache out.

An engine is any callable with `HFGenerate.__call__`'s signature that returns a `Generation`.
`HFGenerate` runs transformers' `generate` and reduces each decoding step's distribution to
the three numbers the rollout keeps (log-prob of the sampled token, entropy, self-certainty),
so no second forward over the sampled sequences is needed. docs/training.md (Rollout engines) says
how an external engine such as vLLM plugs in.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

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


class HFGenerate:
    """transformers' `generate`, with the sampling statistics collected while decoding.

    `cache="dynamic"` grows the keys and values step by step; `cache="static"` preallocates
    them for the longest sequence (fixed shapes), and with `compile=true` the decoding step is
    compiled (CUDA graphs on GPUs). Where the installed transformers or torch cannot do that,
    one log line says so and decoding goes on with the dynamic cache.
    """

    def __init__(self, cache: str = "dynamic", compile: bool = False):
        if cache not in ("dynamic", "static"):
            raise ValueError(f"rollout.engine.cache must be dynamic or static, got {cache!r}")
        self.cache = cache
        self.compile = compile
        self.fell_back = False

    def generation_options(self, model, longest: int) -> dict:
        """`generate`'s options for this engine; `longest` = prompt + max new tokens."""
        if self.cache == "dynamic" or self.fell_back:
            return {}
        from transformers import StaticCache

        # one slot more than decoding fills: the last sampled token's keys go in afterwards
        options = {"cache": StaticCache(config=model.config, max_cache_len=longest)}
        if self.compile:
            from transformers import CompileConfig

            # compiling on CPU is opt-in in transformers; ask for it on every device
            options["compile_config"] = CompileConfig(fullgraph=False)
            options["compile_config"]._compile_all_devices = True
        else:
            options["disable_compile"] = True
        return options

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
        sampling = temperature > 0
        statistics = SamplingStatistics(temperature) if with_stats else None
        kwargs = dict(
            **encoded,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=0 if sampling else None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(eos_token_ids(model, tokenizer)),
            synced_gpus=synced,
            logits_processor=LogitsProcessorList([statistics] if statistics else []),
            return_dict_in_generate=True,
        )
        out = self._generate(model, kwargs, encoded["input_ids"].shape[1] + max_new_tokens)
        prompt_mask = encoded["attention_mask"].repeat_interleave(num_samples, dim=0)
        generation = Generation(out.sequences, prompt_mask)
        if statistics:
            generation.stats = statistics.finish(generation.responses)
        if keep_cache:
            generation.cache = complete_cache(model, out.cache, out.sequences, prompt_mask)
        return generation

    def _generate(self, model, kwargs: dict, longest: int):
        options = self.generation_options(model, longest)
        if not options:
            return model.generate(**kwargs)
        try:
            return model.generate(**kwargs, **options)
        except Exception as error:  # noqa: BLE001 - any failure of the optional fast path
            self.fell_back = True
            log.warning(
                "rollout.engine: %s cache%s not available here (%s: %s); decoding with the"
                " dynamic cache",
                self.cache,
                " + compile" if self.compile else "",
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
            )
            for statistics in kwargs["logits_processor"]:
                statistics.reset()  # of the failed attempt
            return model.generate(**kwargs)


def position_ids_from(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def complete_cache(model, cache, sequences: Tensor, prompt_mask: Tensor):
    """`cache` holding every column of `sequences`: decoding never feeds the last sampled
    token, so its keys and values come from one more single-token step."""
    if cache is None or cache.get_seq_length() >= sequences.shape[1]:
        return cache
    generated = sequences.shape[1] - prompt_mask.shape[1]
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(sequences), generated)], 1)
    model(
        input_ids=sequences[:, -1:],
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask)[:, -1:],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache
