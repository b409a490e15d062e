"""Policy likelihoods of answer branches after every state of a trajectory.

`PrefixSharedScorer` scores all T*K branches of a trajectory in one forward: the trajectory,
followed by one trie of branches per state, with a 4D attention mask that gives every trie node
exactly the context it would see as a sequence of its own. `NaiveScorer` scores every
(state, branch) as its own sequence: the oracle the shared scorer must match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from covo.infra.checks import Rule, choice
from covo.rollout.context_cache import ContextCache, with_cache

# the autocast dtype a scorer may run in (`scoring_dtype`); null: the model's own
SCORING_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}
SCORING_DTYPE_RULE: Rule = ("scoring_dtype", *choice(*SCORING_DTYPES))


@dataclass
class PackedTrie:
    """One forward's input: context, then per state the trie of its branches.

    `input_ids`, `position_ids`: [L]. `allowed`: [L, L] bool, row q may attend to column k.
    Scored token p (flattened over states and branches) is `targets[p]`, predicted by the
    logits at `logit_pos[p]`, and belongs to branch `owner[p]` (index into the flat branches).
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    logit_pos: Tensor
    targets: Tensor
    owner: Tensor


def check_inputs(
    context_ids: list[int],
    state_ends: list[int],
    branches: list[list[list[int]]],
    scored_from: list[list[int]],
) -> None:
    """Raise ValueError on inputs that leave a branch token without a prediction."""
    if not (len(state_ends) == len(branches) == len(scored_from)):
        raise ValueError("state_ends, branches and scored_from need one entry per state")
    for end, state_branches, starts in zip(state_ends, branches, scored_from):
        if not 1 <= end <= len(context_ids):
            raise ValueError(f"state end {end} outside [1, {len(context_ids)}]")
        if len(state_branches) != len(starts):
            raise ValueError("scored_from needs one start per branch")
        for branch, start in zip(state_branches, starts):
            if not 0 <= start < len(branch):
                raise ValueError(f"scored_from {start} leaves nothing to score in {branch}")


def trie_size(state_branches: list[list[int]]) -> int:
    """Distinct non-empty prefixes over the branches: the nodes of their trie."""
    return len({tuple(b[:j]) for b in state_branches for j in range(1, len(b) + 1)})


def floor_tokens(state_ends: list[int], branches: list[list[list[int]]]) -> int:
    """Tokens an ideal prefix-sharing scorer feeds: the context up to the last scored state
    plus every trie node once."""
    ends = [end for end, bs in zip(state_ends, branches) if bs]
    return (max(ends) if ends else 0) + sum(trie_size(bs) for bs in branches)


def pack_trie(
    context_ids: list[int],
    state_ends: list[int],
    branches: list[list[list[int]]],
    scored_from: list[list[int]],
    context_cached: bool = False,
) -> PackedTrie:
    """Lay out the context (up to the last state with branches) and one branch trie per state.

    A trie node at depth d (1-based) under state i gets position `state_ends[i] + d - 1` and
    attends to `context[:state_ends[i]]` and its ancestors (itself included). Columns
    `[0, n_ctx)` of `allowed` are the context, then one column per fed token.

    With `context_cached` the context is not fed (its keys and values come from a cache) and
    `allowed` is [fed, n_ctx + fed]. A state whose first branch token is scored then re-feeds
    its last context token once (a root at position `state_ends[i] - 1`), as the logits that
    predict that token need its hidden state.
    """
    n_ctx = max(end for end, bs in zip(state_ends, branches) if bs)
    offset = n_ctx if context_cached else 0  # column of fed token r: r + offset
    ids = [] if context_cached else list(context_ids[:n_ctx])
    pos = list(range(len(ids)))
    sees_context = []  # per fed non-context token: how many context columns it attends to
    rows, cols = [], []
    logit_pos, targets, owner = [], [], []

    def feed(token: int, position: int, context_seen: int, ancestors: list[int]) -> int:
        row = len(ids)
        ids.append(token)
        pos.append(position)
        sees_context.append(context_seen)
        rows.extend([row] * (len(ancestors) + 1))
        cols.extend([*ancestors, row + offset])
        return row

    flat = 0
    for end, state_branches, starts in zip(state_ends, branches, scored_from):
        before_first = end - 1  # row of the logits predicting branch token 0
        if context_cached and 0 in starts:
            before_first = feed(context_ids[end - 1], end - 1, end - 1, [])
        children: dict[tuple[int, int], int] = {}
        ancestors: dict[int, list[int]] = {-1: []}
        for branch, start in zip(state_branches, starts):
            path, node = [], -1
            for depth, token in enumerate(branch, start=1):
                child = children.get((node, token))
                if child is None:
                    child = feed(token, end + depth - 1, end, ancestors[node])
                    children[(node, token)] = child
                    ancestors[child] = ancestors[node] + [child + offset]
                path.append(child)
                node = child
            for j in range(start, len(branch)):
                logit_pos.append(before_first if j == 0 else path[j - 1])
                targets.append(branch[j])
                owner.append(flat)
            flat += 1
    length, first = len(ids), len(ids) - len(sees_context)
    allowed = torch.zeros(length, length + offset, dtype=torch.bool)
    allowed[:first, :first] = torch.ones(first, first, dtype=torch.bool).tril()
    allowed[first:, :n_ctx] = torch.arange(n_ctx)[None, :] < torch.tensor(sees_context)[:, None]
    allowed[rows, cols] = True

    def long(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long)

    return PackedTrie(long(ids), long(pos), allowed, long(logit_pos), long(targets), long(owner))


def gathered_nll(
    hidden: Tensor, head: torch.nn.Module, logit_pos: Tensor, targets: Tensor, chunk_size: int
) -> Tensor:
    """NLL [P] (float32) of `targets` [P] under `head(hidden[logit_pos])`, hidden [L, H].

    Logits exist only for the distinct positions asked for, `chunk_size` rows at a time.
    """
    positions, inverse = torch.unique(logit_pos, return_inverse=True)
    nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(positions), chunk_size):
        logp = head(hidden[positions[start : start + chunk_size]]).float().log_softmax(-1)
        pick = (inverse >= start) & (inverse < start + chunk_size)
        nll[pick] = -logp[inverse[pick] - start, targets[pick]]
    return nll


def split_means(nll: Tensor, owner: Tensor, sizes: list[int]) -> list[Tensor]:
    """Mean of `nll` [P] per owner branch, split into one [K_i] tensor per state."""
    n = sum(sizes)
    total = torch.zeros(n, dtype=torch.float32, device=nll.device).index_add_(0, owner, nll)
    count = torch.zeros(n, dtype=torch.float32, device=nll.device)
    count.index_add_(0, owner, torch.ones_like(nll))
    return list((total / count).cpu().split(sizes))


class _ScorerBase:
    def __init__(self, model, tokenizer, dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.reset_counters()

    def reset_counters(self) -> None:
        self.tokens_processed = 0
        self.floor_tokens = 0
        self.reused_tokens = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def branch_nll(
        self,
        context_ids: list[int],
        state_ends: list[int],
        branches: list[list[list[int]]],
        scored_from: list[list[int]],
        context_cache: ContextCache | None = None,
    ) -> list[Tensor]:
        """Mean NLL [K_i] (float32, CPU) of each branch's scored tokens, per state.

        `context_cache`: the context's keys and values from a forward of this model (the
        rollout's log-prob pass); a scorer that can use it does not feed the context again.
        """
        check_inputs(context_ids, state_ends, branches, scored_from)
        if context_cache is not None:
            needed = max(state_ends, default=0)
            if context_cache.ids[:needed] != context_ids[:needed]:
                raise ValueError(f"context_cache does not hold the first {needed} context ids")
        self.floor_tokens += floor_tokens(state_ends, branches)
        return self._score(context_ids, state_ends, branches, scored_from, context_cache)

    def autocast(self) -> torch.autocast:
        """Autocast to a 16-bit `dtype`; off for float32 and for None (the model's own), so an
        enclosing autocast (Lightning's bf16-mixed) does not compute in bf16 instead."""
        low = self.dtype not in (None, torch.float32)
        return torch.autocast(self.device.type, dtype=self.dtype if low else None, enabled=low)


class PrefixSharedScorer(_ScorerBase):
    """Scores a trajectory's branches in one forward over the trajectory plus branch tries.

    `chunk_size`: positions per output-head call (bounds the [chunk, vocab] logits).
    `states_per_forward`: None scores every state in one forward; a number splits the states
    into groups, each forward re-feeding the context (less memory, more tokens).
    Given a `context_cache`, a forward feeds only the tries (plus, per state whose first branch
    token is scored, its last context token) and reads the context from the cache;
    `reused_tokens` counts the context tokens read that way.
    The model must be a causal LM whose logits are `get_output_embeddings()(base_model(...))`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        dtype: torch.dtype | None = None,
        chunk_size: int = 256,
        states_per_forward: int | None = None,
    ) -> None:
        super().__init__(model, tokenizer, dtype)
        self.chunk_size = chunk_size
        self.states_per_forward = states_per_forward

    def _score(self, context_ids, state_ends, branches, scored_from, cache) -> list[Tensor]:
        step = self.states_per_forward or max(len(state_ends), 1)
        out: list[Tensor] = []
        for s in range(0, len(state_ends), step):
            part = slice(s, s + step)
            out += self._forward(
                context_ids, state_ends[part], branches[part], scored_from[part], cache
            )
        return out

    def _forward(
        self,
        context_ids: list[int],
        state_ends: list[int],
        branches: list[list[list[int]]],
        scored_from: list[list[int]],
        cache: ContextCache | None,
    ) -> list[Tensor]:
        sizes = [len(bs) for bs in branches]
        if not any(sizes):
            return [torch.zeros(0) for _ in sizes]
        packed = pack_trie(context_ids, state_ends, branches, scored_from, cache is not None)
        device, dtype = self.device, self.dtype or self.model.dtype
        # additive float mask: eager attention adds the mask, so a bool one would be added as 0/1
        mask = torch.zeros(packed.allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~packed.allowed.to(device), torch.finfo(dtype).min)
        n_cached = packed.allowed.shape[1] - packed.allowed.shape[0]
        with self.autocast():
            hidden = self.model.base_model(
                input_ids=packed.input_ids[None].to(device),
                attention_mask=mask[None, None],
                position_ids=packed.position_ids[None].to(device),
                **with_cache(cache.model_cache(n_cached) if cache is not None else None),
                use_cache=cache is not None,
            ).last_hidden_state[0]
            nll = gathered_nll(
                hidden,
                self.model.get_output_embeddings(),
                packed.logit_pos.to(device),
                packed.targets.to(device),
                self.chunk_size,
            )
        self.tokens_processed += len(packed.input_ids)
        self.reused_tokens += n_cached
        return split_means(nll, packed.owner.to(device), sizes)


class NaiveScorer(_ScorerBase):
    """The oracle: each (state, branch) as its own right-padded sequence, K per forward.

    It always feeds the context itself (a `context_cache` is ignored).
    """

    def _score(self, context_ids, state_ends, branches, scored_from, cache) -> list[Tensor]:
        return [
            self._state(context_ids[:end], bs, starts)
            for end, bs, starts in zip(state_ends, branches, scored_from)
        ]

    def _state(self, prefix: list[int], state_branches: list[list[int]], starts: list[int]):
        if not state_branches:
            return torch.zeros(0)
        width, device = max(map(len, state_branches)), self.device
        ids = [prefix + b + [0] * (width - len(b)) for b in state_branches]
        mask = [[1] * (len(prefix) + len(b)) + [0] * (width - len(b)) for b in state_branches]
        # logits at position len(prefix) - 1 + j predict branch token j
        keep = torch.arange(len(prefix) - 1, len(prefix) + width - 1, device=device)
        with self.autocast():
            logits = self.model(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                use_cache=False,
                logits_to_keep=keep,
            ).logits
        logp = logits.float().log_softmax(-1)
        self.tokens_processed += len(ids) * len(ids[0])
        return torch.stack(
            [
                -logp[k, torch.arange(s, len(b), device=device), b[s:]].mean()
                for k, (b, s) in enumerate(zip(state_branches, starts))
            ]
        ).cpu()
