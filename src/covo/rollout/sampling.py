"""Rollout: sample N responses per prompt, with the sampling distribution's per-token statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from covo.rewards.base import Group, Withheld
from covo.rollout.context_cache import ContextCache, cache_of, split_cache
from covo.rollout.engine import (
    STAT_NAMES,
    Generation,
    HFGenerate,
    distribution_stats,
    eos_token_ids,
    position_ids_from,
)

LOGIT_CHUNK = 256  # positions per output-head call: bounds the [chunk, vocab] logits


@dataclass
class Rollout:
    """B prompts x N responses, prompt-major (response r answers prompt r // N).

    `sequences` [R, P+G]: left-padded prompts followed by right-padded responses.
    `response_mask` [R, G]: 1.0 on generated tokens up to and including the first EOS.
    `logprobs`, `entropy`, `self_certainty` [R, G]: the sampling policy's per-token values
    (float32, zero on padding); `self_certainty` is KL(uniform || policy) per token.
    `context_caches[r]`, when kept, holds the keys and values of prompt + response r (without
    padding or EOS) from that same forward, for the reward's scorer. `views[name]` holds the
    responses sampled from the same prompts put through view `name` (`covo.rollout.views`).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    self_certainty: torch.Tensor
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    truncated: torch.Tensor
    group_size: int
    context_caches: list[ContextCache] | None = None
    views: dict[str, Rollout] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def groups(
        self, truths: list[str | Withheld | None], step: int = 0, rank: int = 0
    ) -> list[Group]:
        """One `Group` per prompt: what a reward sees; `truths[b]` what it is given of prompt
        b's label (`label_for`)."""
        n, out = self.group_size, []
        views = {name: view.groups(truths, step, rank) for name, view in self.views.items()}
        lengths = [len(ids) for ids in self.response_ids]
        for b, prompt_ids in enumerate(self.prompt_ids):
            rows = range(b * n, (b + 1) * n)

            def cut(values: torch.Tensor) -> list[torch.Tensor]:
                return [values[r, : lengths[r]].float().cpu() for r in rows]  # noqa: B023

            out.append(
                Group(
                    prompt_ids=prompt_ids,
                    response_ids=[self.response_ids[r] for r in rows],
                    texts=[self.texts[r] for r in rows],
                    token_logprobs=cut(self.logprobs),
                    token_entropy=cut(self.entropy),
                    token_self_certainty=cut(self.self_certainty),
                    truth=truths[b],
                    context_caches=[self.context_caches[r] for r in rows]
                    if self.context_caches
                    else None,
                    views={name: groups[b] for name, groups in views.items()},
                    step=step,
                    rank=rank,
                    index=b,
                )
            )
        return out


def format_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[str]:
    if not chat_template:
        return prompts
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


def encode_prompts(tokenizer, texts: list[str], device) -> dict[str, torch.Tensor]:
    # chat templates already carry their special tokens
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def response_mask_from(tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """[R, G] generated ids -> float mask up to and including the first EOS."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= tokens == eos
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).float()


def sample(
    model,
    tokenizer,
    prompts: list[str],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    synced: bool = False,
    engine=None,
    keep_cache: bool = False,
    with_stats: bool = True,
) -> Generation:
    """`num_samples` responses per prompt from `engine` (transformers' `generate` by default;
    greedy when temperature is 0). `synced` keeps every rank stepping until all ranks are
    done: needed when parameters are sharded (FSDP), where each forward is a collective."""
    engine = engine or HFGenerate()
    encoded = encode_prompts(tokenizer, prompts, model.device)
    return engine(
        model,
        tokenizer,
        encoded,
        num_samples,
        max_new_tokens,
        temperature,
        top_p,
        synced,
        keep_cache=keep_cache,
        with_stats=with_stats,
    )


class ChosenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[target] at every position, without a full-vocabulary
    log-softmax: a log-sum-exp and a gather per chunk of positions. Backward recomputes each
    chunk's softmax from the saved logits (in their own dtype) instead of keeping a float32
    log-softmax of every position: d logp / d logits = (onehot(target) - softmax) / T."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:
        flat, index = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        lse = torch.empty(len(flat), dtype=torch.float32, device=logits.device)
        chosen = torch.empty_like(lse)
        for start in range(0, len(flat), chunk):
            part = flat[start : start + chunk].float() / temperature
            lse[start : start + chunk] = torch.logsumexp(part, -1)
            chosen[start : start + chunk] = part.gather(-1, index[start : start + chunk])[:, 0]
        ctx.save_for_backward(logits, index, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return (chosen - lse).view(targets.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, index, lse = ctx.saved_tensors
        flat, grad = logits.reshape(-1, logits.shape[-1]), grad.reshape(-1, 1).float()
        out = torch.empty_like(flat)
        temperature, chunk = ctx.temperature, ctx.chunk
        for start in range(0, len(flat), chunk):
            rows = slice(start, start + chunk)
            part = torch.exp(flat[rows].float() / temperature - lse[rows, None]).neg_()
            part.scatter_add_(-1, index[rows], torch.ones_like(index[rows], dtype=part.dtype))
            out[rows] = part.mul_(grad[rows] / temperature)
        return out.view(logits.shape), None, None, None


def chosen_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk: int = 256
) -> Tensor:
    """[..., V] logits and [...] token ids -> [...] float32 log-probs of those tokens at
    `temperature` (0 = none, greedy's distribution), `chunk` positions at a time."""
    temperature = temperature if temperature > 0 else 1.0
    return ChosenLogprobs.apply(logits, targets, float(temperature), chunk)


def chosen_token_stats(logits: Tensor, targets: Tensor, temperature: float) -> dict[str, Tensor]:
    """[..., V] logits and [...] token ids -> the log-prob of each token, the entropy and the
    self-certainty of each distribution at `temperature` ([...] float32 each)."""
    logp, entropy, self_certainty = distribution_stats(logits, temperature)
    return {
        "logprobs": logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "entropy": entropy,
        "self_certainty": self_certainty,
    }


def head_stats(
    model, hidden: Tensor, targets: Tensor, temperature: float, chunk: int | None = None
) -> dict[str, Tensor]:
    """`chosen_token_stats` ([P] each) of the logits `model`'s output head gives `hidden`
    [P, H] for `targets` [P], `chunk` positions at a time (`LOGIT_CHUNK` by default): the
    [chunk, V] tensors of one chunk are the largest this makes, never [P, V]."""
    head, chunk = model.get_output_embeddings(), chunk or LOGIT_CHUNK
    parts = [
        chosen_token_stats(head(hidden[i : i + chunk]), targets[i : i + chunk], temperature)
        for i in range(0, len(targets), chunk)
    ]
    return {name: torch.cat([part[name] for part in parts]) for name in STAT_NAMES}


def response_token_stats(
    model,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
    with_distribution_stats: bool = True,
    keep_cache: bool = False,
) -> dict:
    """Per response token: log-prob of the sampled token, and (optionally) the entropy and
    KL(uniform || policy) of the policy's next-token distribution. All [R, G], float32.
    With `keep_cache`, also the forward's model cache (keys and values) under "cache".

    Logits are computed only where a response token is predicted (they dominate memory).
    The log-probs alone go through the model's own forward (FSDP2's hooks live there; the
    update trains through it) and form no full-vocabulary log-softmax. The distribution
    statistics (no-grad, on an unsharded model) run the output head on `LOGIT_CHUNK`
    positions at a time (`head_stats`): like `covo.rollout.groups`, this needs a causal LM
    whose logits are `get_output_embeddings()(base_model(...))`.
    """
    length = sequences.shape[1]
    predicting = torch.arange(length - response_len - 1, length - 1, device=sequences.device)
    targets = sequences[:, -response_len:]
    inputs = dict(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=keep_cache,
    )
    if not with_distribution_stats:
        logits = model(**inputs, logits_to_keep=predicting).logits
        return {"logprobs": chosen_logprobs(logits, targets, temperature)}
    out = model.base_model(**inputs)
    hidden = out.last_hidden_state[:, predicting]
    flat = head_stats(model, hidden.flatten(0, 1), targets.flatten(), temperature)
    stats = {name: values.view(targets.shape) for name, values in flat.items()}
    if keep_cache:
        stats["cache"] = cache_of(out)
    return stats


def batched_token_stats(
    model, sequences, attention_mask, response_len, temperature, chunk, keep_cache=False
) -> tuple[dict[str, torch.Tensor], list]:
    """`response_token_stats` over row chunks, without gradients; also each chunk's model
    cache (None unless `keep_cache`)."""
    parts, caches = [], []
    with torch.no_grad():
        for start in range(0, sequences.shape[0], chunk):
            rows = slice(start, start + chunk)
            stats = response_token_stats(
                model,
                sequences[rows],
                attention_mask[rows],
                response_len,
                temperature,
                keep_cache=keep_cache,
            )
            caches.append(stats.pop("cache", None))
            parts.append(stats)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, caches


def build_rollout(
    model,
    tokenizer,
    prompts: list[str],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stats_chunk: int = 4,
    synced: bool = False,
    keep_cache: bool = False,
    engine=None,
    one_pass: bool = True,
) -> Rollout:
    """Sample, keeping the sampling distribution's per-token statistics.

    `one_pass`: the engine reduces each decoding step's distribution to the statistics and
    hands over its own keys and values; otherwise (or when the engine gives no statistics)
    one no-grad forward per `stats_chunk` rows computes them after sampling. `keep_cache`
    keeps the keys and values per response (`Rollout.context_caches`; None for models whose
    cache layers are not plain full attention).
    """
    generation = sample(
        model,
        tokenizer,
        prompts,
        num_samples,
        max_new_tokens,
        temperature,
        top_p,
        synced,
        engine,
        keep_cache=keep_cache and one_pass,
        with_stats=one_pass,
    )
    sequences, prompt_mask, tokens = (
        generation.sequences,
        generation.prompt_mask,
        generation.responses,
    )
    prompt_len = generation.prompt_len
    eos = eos_token_ids(model, tokenizer)
    response_mask = response_mask_from(tokens, eos)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    if generation.stats is not None:
        stats, caches, chunk = generation.stats, [generation.cache], len(sequences)
    else:
        stats, caches = batched_token_stats(
            model, sequences, attention_mask, tokens.shape[1], temperature, stats_chunk, keep_cache
        )
        chunk = stats_chunk
    stats = {key: values * response_mask for key, values in stats.items()}
    response_ids, texts, truncated = [], [], []
    for row, mask in zip(tokens.tolist(), response_mask.long().tolist()):
        ids = row[: sum(mask)]
        ended = bool(ids) and ids[-1] in eos
        truncated.append(not ended)
        response_ids.append(ids[:-1] if ended else ids)
        texts.append(tokenizer.decode(response_ids[-1], skip_special_tokens=True))
    prompt_rows = sequences[::num_samples, :prompt_len]
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(prompt_rows, prompt_mask[::num_samples])]
    context_caches = None
    if keep_cache:
        # prompts are left-padded: row r's tokens start after its padding
        rows = [
            (prompt_ids[r // num_samples] + ids, prompt_len - len(prompt_ids[r // num_samples]))
            for r, ids in enumerate(response_ids)
        ]
        chunks = [
            split_cache(cache, rows[i * chunk : (i + 1) * chunk]) for i, cache in enumerate(caches)
        ]
        if all(part is not None for part in chunks):
            context_caches = [c for part in chunks for c in part]
    return Rollout(
        sequences=sequences,
        attention_mask=attention_mask,
        response_mask=response_mask,
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        texts=texts,
        truncated=torch.tensor(truncated),
        group_size=num_samples,
        context_caches=context_caches,
        **stats,
    )
