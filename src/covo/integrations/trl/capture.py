"""The policy's per-token statistics, and its keys and values, kept from TRL's own `generate`.

TRL's transformers path samples with `unwrapped_model.generate(input_ids=..., attention_mask=...,
generation_config=trainer.generation_config)` (prompts left-padded) and keeps the sequences'
tokens up to the first EOS as `completion_ids`. `GenerationCapture` stands in for that model's
`generate`: on TRL's call (recognised by the trainer's own `generation_config`) it runs the
original with one more logits processor and `return_dict_in_generate=True`, and returns TRL the
sequences tensor it would have had. The processor reads each decoding step's raw logits (the
output head's, as the batched forward of `covo.rollout.groups` reads them, before any
repetition penalty or suppressed token) at TRL's temperature and keeps three numbers per row
(`SamplingStatistics`), so memory stays O(rows x vocab). For CoVo's scorer the decoding cache,
completed by one single-token step, is cut right after generate into one copy per row of that
row's own prompt + response (no padding, nothing past its EOS) on the policy's device
(`cache="device"`) or in CPU memory (`cache="cpu"`, moved back one group at a time); the
padded cache generate built is freed then. `cache="none"` keeps the statistics only.

`take` hands a reward call its rows only when they provably are the ones generated: same
prompts and completion ids row for row, same temperature, same optimizer step, and no dropout
active while sampling (TRL samples in training mode; the reward's forwards run in eval mode).
Anything else (vLLM, continuous batching, tool calls that rewrote the completions, another
generate call) leaves the reward to its batched forward. The kept keys and values are handed
over once and dropped by any `take` that cannot use them, so they never outlive the reward
call of their step. With TRL's tools on (a generate call per turn) nothing is captured.

The capture holds its trainer by a weak reference: `del trainer` frees the trainer even while
the model (and so its `generate`) lives on; `CaptureLifetime` removes it when training ends.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LogitsProcessorList, TrainerCallback

from covo.integrations.trl.sharding import synced_generation
from covo.models import lora
from covo.rollout.context_cache import ContextCache, cache_of, split_cache
from covo.rollout.engine import (
    STAT_NAMES,
    SamplingStatistics,
    complete_cache,
    feed_last_token,
)

CACHE_MODES = ("device", "cpu", "none")


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


def without_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


def complete_in_step(model: nn.Module, cache, sequences: Tensor, prompt_mask: Tensor):
    """`complete_cache` when generate ran in step across processes: every process runs the
    single-token step (under sharded parameters a forward is a collective), also one whose
    rows all ended early. That one kept decoding in step with the others, so its cache already
    holds every column of `sequences` (and copies of the last token after them): its step adds
    one more column after all of them, which no row's slice reads."""
    return feed_last_token(model, cache, sequences, prompt_mask, cache.get_seq_length() + 1)


def moved(context: ContextCache, device, copy: bool = False) -> ContextCache:
    """`context` with its keys and values on `device` (copies with `copy`)."""
    layers = [(k.to(device, copy=copy), v.to(device, copy=copy)) for k, v in context.layers]
    return ContextCache(context.ids, layers)


def own_rows(cache, rows: list[tuple[list[int], int]], device) -> list[ContextCache] | None:
    """Per row (`ids` from column `start` of `cache`), a `ContextCache` of copies of its own
    columns only, on `device`; None when the cache is not plain full attention. The copies own
    their memory: `cache` can be freed."""
    kept = split_cache(cache, rows)
    return None if kept is None else [moved(context, device, copy=True) for context in kept]


@dataclass
class Generated:
    """One TRL generate call: per row its prompt and completion ids (as TRL keeps them), the
    statistics [R, G] of the sampled tokens (CPU), and each row's own keys and values of
    prompt + response (`own_rows`; None unless kept, or when the cache is not plain full
    attention)."""

    step: int
    temperature: float
    prompts: list[list[int]]
    completions: list[list[int]]
    stats: dict[str, Tensor]
    caches: list[ContextCache] | None


class GenerationCapture:
    """The trainer's model's `generate`, recording what each reward call needs (module
    docstring). `install` puts it in place once per model; `remove` gives the model back its
    own `generate`."""

    def __init__(self, trainer, model: nn.Module, original) -> None:
        self.trainer_ref = weakref.ref(trainer)
        self.model, self.original = model, original
        self.cache = "none"
        self.generated: Generated | None = None

    @property
    def trainer(self):
        return self.trainer_ref()

    @classmethod
    def install(cls, trainer, cache: str = "none") -> GenerationCapture:
        """The capture of `trainer`'s model, put in place if it is not; `cache` (CACHE_MODES)
        asks for the keys and values too ("device" wins over "cpu", either over "none")."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        current = model.__dict__.get("generate")
        if isinstance(current, cls) and current.trainer is trainer:
            capture = current
        else:
            original = current.original if isinstance(current, cls) else model.generate
            capture = model.generate = cls(trainer, model, original)
        capture.cache = min(capture.cache, cache, key=CACHE_MODES.index)
        return capture

    def remove(self) -> None:
        self.generated = None
        if self.model.__dict__.get("generate") is self:
            del self.model.generate

    def __call__(self, *args, **kwargs):
        config, trainer = kwargs.get("generation_config"), self.trainer
        trainers = config is not None and config is getattr(trainer, "generation_config", None)
        if trainers:
            self.generated = None  # the last call's keys and values go before this one's
        if (
            not trainers
            or getattr(trainer, "tools", None)
            or args
            or config.return_dict_in_generate
            or "logits_processor" in kwargs
            or drops_out(self.model)
        ):
            return self.original(*args, **kwargs)
        policy = lora.base_of(self.model)
        temperature = trainer.temperature
        statistics = HeadStatistics(temperature, policy.get_output_embeddings())
        kwargs["generation_config"] = copy.deepcopy(config)
        kwargs["generation_config"].return_dict_in_generate = True
        try:
            out = self.original(**kwargs, logits_processor=LogitsProcessorList([statistics]))
        finally:
            statistics.hook.remove()
        prompt_mask, prompt_len = kwargs["attention_mask"], kwargs["input_ids"].shape[1]
        eos = set(trainer.eos_token_ids)
        prompts = [row[m.bool()].tolist() for row, m in zip(kwargs["input_ids"], prompt_mask)]
        completions = [completion_of(row, eos) for row in out.sequences[:, prompt_len:].tolist()]
        stats = statistics.finish(out.sequences[:, prompt_len:])
        caches = None
        if self.cache != "none":
            complete = complete_in_step if synced_generation(policy) else complete_cache
            with torch.no_grad():
                cache = complete(policy, cache_of(out), out.sequences, prompt_mask)
            rows = [
                (prompt + without_eos(ids, eos), prompt_len - len(prompt))
                for prompt, ids in zip(prompts, completions)
            ]
            device = policy.device if self.cache == "device" else "cpu"
            caches = own_rows(cache, rows, device)
            del cache
        sequences = out.sequences
        del out  # generate's padded cache goes with it
        self.generated = Generated(
            step=trainer.state.global_step,
            temperature=temperature,
            prompts=prompts,
            completions=completions,
            stats={name: value.float().cpu() for name, value in stats.items()},
            caches=caches,
        )
        return sequences

    def take(
        self, prompt_ids: list, completion_ids: list, responses: list[list[int]], keep_cache: bool
    ) -> tuple[list[dict[str, Tensor]], list[ContextCache | None] | None] | None:
        """Per row, the statistics of `responses` (the completions without their EOS)
        ({name: [G_i]}, float32, CPU) and, with `keep_cache`, the keys and values of prompt +
        response (None for an empty response; None for all when they were not kept, or went
        to an earlier call: the statistics stand alone then); None when these rows are not the
        ones the last TRL generate call produced at this step and temperature. The kept keys
        and values are handed over once, and dropped whenever they cannot be used."""
        generated, trainer = self.generated, self.trainer
        if (
            generated is None
            or trainer is None
            or generated.step != trainer.state.global_step
            or generated.temperature != trainer.temperature
            or generated.prompts != [list(ids) for ids in prompt_ids]
            or generated.completions != [list(ids) for ids in completion_ids]
        ):
            self.generated = None
            return None
        stats = [
            {name: generated.stats[name][r, : len(ids)] for name in STAT_NAMES}
            for r, ids in enumerate(responses)
        ]
        if not keep_cache:
            return stats, None
        caches, generated.caches = generated.caches, None
        if caches is None:
            return stats, None
        return stats, [c if ids else None for c, ids in zip(caches, responses)]


class CaptureLifetime(TrainerCallback):
    """Puts the capture in place when training begins and gives the model its own `generate`
    back when it ends (with whatever it still holds)."""

    def __init__(self, capture: GenerationCapture):
        self.capture = capture

    def on_train_begin(self, args, state, control, **kwargs):
        if "generate" not in self.capture.model.__dict__:
            self.capture.model.generate = self.capture
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.capture.remove()
        return control
