"""Groups of given responses: the `Group` a reward sees for response ids sampled elsewhere
(the score command, the study, TRL's rollout), with the policy's per-token statistics from
batched no-grad forwards.

Per group the prompt, all but its last token, runs once and its keys and values are shared by
the group's responses. The responses then run right-padded, each behind the prompt's last
token (whose hidden state predicts the response's first token), longest first, at most
`token_budget` fed tokens (rows x (longest response + 1)) per forward; the output head and
the statistics run on `LOGIT_CHUNK` positions at a time, so a forward's memory is its
activations and keys and values, not [rows, longest, vocab] logits. The numbers are those of
one forward over prompt + response per response. Like `PrefixSharedScorer`, this needs a
causal LM whose logits are `get_output_embeddings()(base_model(...))`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from covo.models.loading import LoadedModel
from covo.rewards.base import Group, Withheld
from covo.rewards.covo.reward import encode
from covo.rollout.context_cache import ContextCache, cache_of, plain_layers, split_cache, with_cache
from covo.rollout.engine import STAT_NAMES, position_ids_from
from covo.rollout.sampling import format_prompts, head_stats

# Group field <- statistic
STAT_FIELDS = {
    "token_logprobs": "logprobs",
    "token_entropy": "entropy",
    "token_self_certainty": "self_certainty",
}
TOKEN_BUDGET = 8192


def forwards(lengths: list[int], token_budget: int) -> list[list[int]]:
    """The non-empty responses' indices, longest first, cut into forwards of at most
    `token_budget` fed tokens, rows x (longest + 1); one row a forward at least."""
    out: list[list[int]] = []
    for i in sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i]):
        if out and (len(out[-1]) + 1) * (lengths[out[-1][0]] + 1) <= token_budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def prompt_prefix(model, prompt_ids: list[int]) -> list[tuple] | None:
    """Keys and values of `prompt_ids[:-1]` per layer; None for a one-token prompt or a model
    whose cache is not plain full attention."""
    if len(prompt_ids) < 2:
        return None
    out = model.base_model(
        input_ids=torch.tensor([prompt_ids[:-1]], device=model.device), use_cache=True
    )
    layers = plain_layers(cache_of(out))
    return None if layers is None else [(layer.keys, layer.values) for layer in layers]


def repeated(prefix: list[tuple] | None, rows: int) -> DynamicCache | None:
    """A model cache whose `rows` rows each hold `prefix`'s keys and values."""
    if prefix is None:
        return None
    return DynamicCache(
        [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix]
    )


@torch.no_grad()
def response_stats(
    model,
    prompt_ids: list[int],
    response_ids: list[list[int]],
    temperature: float = 1.0,
    keep_cache: bool = False,
    token_budget: int = TOKEN_BUDGET,
) -> tuple[list[dict[str, torch.Tensor]], list[ContextCache | None]]:
    """Per response to `prompt_ids`: the log-prob, entropy and self-certainty of its tokens
    under `model` at `temperature` ({name: [G_i]}, float32, CPU); with `keep_cache` also the
    keys and values of prompt + response (None for an empty response, for all without
    `keep_cache` or when the model's cache is not plain full attention)."""
    prompt_ids, device = list(prompt_ids), model.device
    stats = [{name: torch.zeros(0) for name in STAT_NAMES} for _ in response_ids]
    caches: list[ContextCache | None] = [None] * len(response_ids)
    prefix = prompt_prefix(model, prompt_ids)
    fed_prompt = prompt_ids[-1:] if prefix is not None else prompt_ids
    for rows in forwards([len(ids) for ids in response_ids], token_budget):
        responses = [list(response_ids[r]) for r in rows]
        width = len(responses[0])
        fed = [fed_prompt + ids + [0] * (width - len(ids)) for ids in responses]
        mask = [[1] * (len(prompt_ids) + len(ids)) + [0] * (width - len(ids)) for ids in responses]
        mask = torch.tensor(mask, device=device)
        out = model.base_model(
            input_ids=torch.tensor(fed, device=device),
            attention_mask=mask,
            position_ids=position_ids_from(mask)[:, -len(fed[0]) :],
            **with_cache(repeated(prefix, len(rows))),
            use_cache=keep_cache or prefix is not None,
        )
        # the hidden state before each response token predicts it; padding is not scored
        start, lengths = len(fed_prompt) - 1, [len(ids) for ids in responses]
        hidden = out.last_hidden_state
        predicting = torch.cat([hidden[j, start : start + n] for j, n in enumerate(lengths)])
        targets = torch.tensor([t for ids in responses for t in ids], device=device)
        values = head_stats(model, predicting, targets, temperature)
        split = {name: v.float().cpu().split(lengths) for name, v in values.items()}
        for j, r in enumerate(rows):
            stats[r] = {name: parts[j] for name, parts in split.items()}
        if keep_cache:
            kept = split_cache(cache_of(out), [(prompt_ids + ids, 0) for ids in responses])
            for r, context in zip(rows, kept or [None] * len(rows)):
                caches[r] = context
    return stats, caches


def group_from_ids(
    model,
    prompt_ids: list[int],
    response_ids: list[list[int]],
    texts: list[str],
    truth: str | Withheld | None,
    keep_cache: bool = False,
    temperature: float = 1.0,
    token_budget: int = TOKEN_BUDGET,
    **where,
) -> Group:
    """The group of responses `response_ids` (no EOS) to the prompt `prompt_ids`, with the
    model's per-token statistics at `temperature` (`response_stats`); `truth` is what the
    reward is given of the label (`covo.rewards.base.label_for`); `where` sets the group's
    `step`, `rank` and `index`. `keep_cache` keeps every trajectory's keys and values
    (`Group.context_caches`), so a scorer does not feed the trajectories again."""
    stats, caches = response_stats(
        model, prompt_ids, response_ids, temperature, keep_cache, token_budget
    )
    return group_of(
        prompt_ids, response_ids, texts, truth, stats, caches if keep_cache else None, **where
    )


def group_of(
    prompt_ids: list[int],
    response_ids: list[list[int]],
    texts: list[str],
    truth: str | Withheld | None,
    stats: list[dict[str, torch.Tensor]],
    caches: list[ContextCache | None] | None,
    **where,
) -> Group:
    """The group of responses whose statistics ({name: [G_i]} per response, `STAT_NAMES`)
    and kept keys and values (or None) were computed already: by `response_stats`, or while
    sampling."""
    return Group(
        prompt_ids=list(prompt_ids),
        response_ids=[list(ids) for ids in response_ids],
        texts=list(texts),
        truth=truth,
        context_caches=caches,
        **{field: [s[name] for s in stats] for field, name in STAT_FIELDS.items()},
        **where,
    )


def make_group(
    loaded: LoadedModel,
    prompt: str,
    responses: list[str],
    truth: str | Withheld | None,
    response_ids: list[list[int]] | None = None,
    keep_cache: bool = False,
) -> Group:
    """The group of `responses` to `prompt` as the policy reads it (its chat template), each
    response's ids as sampled (`response_ids`) or its text tokenised on its own."""
    tokenizer = loaded.tokenizer
    [chat] = format_prompts(tokenizer, [prompt], loaded.chat_template)
    prompt_ids = encode(tokenizer, chat)
    if response_ids is None:
        response_ids = [encode(tokenizer, text) for text in responses]
    return group_from_ids(loaded.model, prompt_ids, response_ids, responses, truth, keep_cache)
