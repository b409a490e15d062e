"""Rollouts: generation engines, sampling with per-token log-probs, a step's rollout from the
policy's replica (`sampler`), prompt views, kept caches."""

from covo.rollout.sampling import (
    Rollout,
    batched_token_stats,
    build_rollout,
    chosen_logprobs,
    encode_prompts,
    eos_token_ids,
    format_prompts,
    response_mask_from,
    response_token_stats,
    sample,
)

__all__ = [
    "Rollout",
    "batched_token_stats",
    "build_rollout",
    "chosen_logprobs",
    "encode_prompts",
    "eos_token_ids",
    "format_prompts",
    "response_mask_from",
    "response_token_stats",
    "sample",
]
