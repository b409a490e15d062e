"""A training step's rollout: the policy's inference replica samples each prompt's group and
every extra view of the prompts that the reward asks for."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig

from covo.models.loading import torch_dtype
from covo.rollout.replica import InferenceView
from covo.rollout.sampling import Rollout, build_rollout, format_prompts
from covo.rollout.views import sample_views


def own_precision(model):
    """A float32 `model` computes in float32: Lightning runs `training_step` and
    `validation_step` under bf16-mixed autocast, which would run its matmuls in bf16 (a replica
    of any other dtype computes in that dtype either way)."""
    if next(model.parameters()).dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, enabled=False)


class RolloutSampler:
    """Samples with the `rollout` settings (its `engine` built) on a replica of the policy in
    `rollout.dtype` (`view`; the policy itself when null). `keep_cache`: each trajectory keeps
    the keys and values of its log-prob forward, for a scorer on the same weights."""

    def __init__(self, tokenizer, chat_template: str | None, rollout: DictConfig):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.cfg = rollout
        self.view = InferenceView(torch_dtype(rollout.dtype))
        self.keep_cache = False

    def scoring_view(self, dtype: torch.dtype | None) -> InferenceView:
        """The replica a scorer in `dtype` reads: the rollout's own unless another dtype."""
        return self.view if dtype in (None, self.view.dtype) else InferenceView(dtype)

    def __call__(self, policy, prompts: list[str], reward) -> Rollout:
        model = self.view(policy)
        model.eval()
        with own_precision(model):
            rollout = self.sample(model, prompts)
            rollout.views = sample_views(reward, prompts, lambda texts: self.sample(model, texts))
        return rollout

    @property
    def metrics(self) -> dict[str, float]:
        """The engine's own per-rollout values (`rollout/engine_fallback`), if it has any."""
        return dict(getattr(self.cfg.engine, "metrics", {}))

    def sample(self, model, prompts: list[str]) -> Rollout:
        cfg = self.cfg
        return build_rollout(
            model,
            self.tokenizer,
            format_prompts(self.tokenizer, prompts, self.chat_template),
            num_samples=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stats_chunk=cfg.stats_chunk,
            keep_cache=self.keep_cache,
            engine=cfg.engine,
            one_pass=cfg.one_pass,
        )
