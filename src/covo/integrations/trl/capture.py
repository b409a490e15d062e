"""The policy's per-token statistics, and its keys and values, kept from TRL's own `generate`.

TRL's transformers path samples with `unwrapped_model.generate(input_ids=..., attention_mask=...,
generation_config=trainer.generation_config)` (prompts left-padded) and keeps the sequences'
tokens up to the first EOS as `completion_ids`. `GenerationCapture` stands in for that model's
`generate`: on TRL's call (recognised by the trainer's own `generation_config`) it runs the
original with one more logits processor and `return_dict_in_generate=True`, and returns TRL the
sequences tensor it would have had. The processor reads each decoding step's raw logits (the
output head's, as the batched forward of `covo.rollout.groups` reads them, before any
repetition penalty or suppressed token) at TRL's temperature and keeps three numbers per row
(`SamplingStatistics`), so memory stays O(rows x vocab). With `keep_cache` the decoding cache,
completed by one single-token step, is kept for CoVo's scorer.

`take` hands a reward call its rows only when they provably are the ones generated: same
prompts and completion ids row for row, same temperature, same optimizer step, and no dropout
active while sampling (TRL samples in training mode; the reward's forwards run in eval mode).
Anything else (vLLM, continuous batching, tool calls that rewrote the completions, another
generate call) leaves the reward to its batched forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LogitsProcessorList

from covo.models import lora
from covo.rollout.context_cache import ContextCache, split_cache
from covo.rollout.engine import STAT_NAMES, SamplingStatistics, complete_cache


class HeadStatistics(SamplingStatistics):
    """`SamplingStatistics` of the output head's raw logits at each decoding step, whatever
    generate's other processors did to the scores it is given."""

    def __init__(self, temperature: float, head: nn.Module):
        super().__init__(temperature)
        self.logits: Tensor | None = None
        self.hook = head.register_forward_hook(self.keep)

    def keep(self, module, args, output: Tensor) -> None:
        self.logits = output[:, -1]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        super().__call__(input_ids, self.logits)
        return scores


def drops_out(model: nn.Module) -> bool:
    """Whether a forward of `model` now drops units: a training-mode dropout module with p > 0,
    or the attention dropout of its config while it trains."""
    training = [m for m in model.modules() if m.training]
    attention = getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in training) or (
        bool(training) and attention > 0
    )


def completion_of(row: list[int], eos: set[int]) -> list[int]:
    """A generated row as TRL keeps it: up to and with its first EOS."""
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


@dataclass
class Generated:
    """One TRL generate call: per row its prompt and completion ids (as TRL keeps them), the
    statistics [R, G] of the sampled tokens, and the decoding cache (None unless kept);
    prompts are left-padded to `prompt_len` columns."""

    step: int
    temperature: float
    prompts: list[list[int]]
    completions: list[list[int]]
    stats: dict[str, Tensor]
    cache: object | None
    prompt_len: int


class GenerationCapture:
    """The trainer's model's `generate`, recording what each reward call needs (module
    docstring). `install` puts it in place once per model; `remove` gives the model back its
    own `generate`."""

    def __init__(self, trainer, model: nn.Module, original) -> None:
        self.trainer, self.model, self.original = trainer, model, original
        self.keep_cache = False
        self.generated: Generated | None = None

    @classmethod
    def install(cls, trainer, keep_cache: bool) -> GenerationCapture:
        model = trainer.accelerator.unwrap_model(trainer.model)
        current = model.__dict__.get("generate")
        if isinstance(current, cls) and current.trainer is trainer:
            capture = current
        else:
            original = current.original if isinstance(current, cls) else model.generate
            capture = model.generate = cls(trainer, model, original)
        capture.keep_cache |= keep_cache
        return capture

    def remove(self) -> None:
        if self.model.__dict__.get("generate") is self:
            del self.model.generate

    def __call__(self, *args, **kwargs):
        config = kwargs.get("generation_config")
        trainers = config is not None and config is getattr(self.trainer, "generation_config", None)
        if (
            not trainers
            or args
            or config.return_dict_in_generate
            or "logits_processor" in kwargs
            or drops_out(self.model)
        ):
            return self.original(*args, **kwargs)
        self.generated = None  # the last call's cache goes before this one's is built
        policy = lora.base_of(self.model)
        temperature = self.trainer.temperature
        statistics = HeadStatistics(temperature, policy.get_output_embeddings())
        kwargs["generation_config"] = copy.deepcopy(config)
        kwargs["generation_config"].return_dict_in_generate = True
        try:
            out = self.original(**kwargs, logits_processor=LogitsProcessorList([statistics]))
        finally:
            statistics.hook.remove()
        prompt_mask, prompt_len = kwargs["attention_mask"], kwargs["input_ids"].shape[1]
        cache = None
        if self.keep_cache:
            with torch.no_grad():
                cache = complete_cache(policy, out.cache, out.sequences, prompt_mask)
        eos = set(self.trainer.eos_token_ids)
        self.generated = Generated(
            step=self.trainer.state.global_step,
            temperature=temperature,
            prompts=[row[m.bool()].tolist() for row, m in zip(kwargs["input_ids"], prompt_mask)],
            completions=[completion_of(row, eos) for row in out.sequences[:, prompt_len:].tolist()],
            stats=statistics.finish(out.sequences[:, prompt_len:]),
            cache=cache,
            prompt_len=prompt_len,
        )
        return out.sequences

    def take(
        self, prompt_ids: list, completion_ids: list, responses: list[list[int]], keep_cache: bool
    ) -> tuple[list[dict[str, Tensor]], list[ContextCache | None] | None] | None:
        """Per row, the statistics of `responses` (the completions without their EOS)
        ({name: [G_i]}, float32, CPU) and, with `keep_cache`, the keys and values of prompt +
        response (None for an empty response); None when these rows are not the ones the last
        TRL generate call produced at this step and temperature, or when the keys and values
        asked for were not kept. The kept cache is handed over once."""
        generated, trainer = self.generated, self.trainer
        if (
            generated is None
            or generated.step != trainer.state.global_step
            or generated.temperature != trainer.temperature
            or generated.prompts != [list(ids) for ids in prompt_ids]
            or generated.completions != [list(ids) for ids in completion_ids]
            or (keep_cache and generated.cache is None)
        ):
            return None
        stats = [
            {name: generated.stats[name][r, : len(ids)].float().cpu() for name in STAT_NAMES}
            for r, ids in enumerate(responses)
        ]
        if not keep_cache:
            return stats, None
        rows = [
            (generated.prompts[r] + ids, generated.prompt_len - len(generated.prompts[r]))
            for r, ids in enumerate(responses)
        ]
        kept = split_cache(generated.cache, rows)
        generated.cache = None
        if kept is None:
            return None
        return stats, [c if ids else None for c, ids in zip(kept, responses)]
