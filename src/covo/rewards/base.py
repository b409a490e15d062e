"""What a reward sees (one prompt's whole group) and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class LabelWithheldError(RuntimeError):
    """A reward read `Group.label` without declaring `needs_labels`: a bug in that reward."""


@dataclass(frozen=True)
class Withheld:
    """What a group holds in place of its label for a reward that does not need labels."""

    reward: str  # the reward's class name


@dataclass
class Group:
    """One prompt and its N sampled responses, as the policy produced them.

    `response_ids[i]` holds the generated token ids of response i without the EOS token and
    without padding; the per-token tensors below have the same length. `label` is the data's
    ground-truth answer (None when the data has none), held in `truth` for a reward that
    declares `needs_labels`; for any other reward `truth` is `Withheld` and reading `label`
    raises `LabelWithheldError` (`label_for`). `context_caches[i]`,
    when present, holds the keys and values of prompt + response i from the rollout's forward,
    for a scorer to reuse. `views[name]` is the group sampled from the same prompt put through
    the view `name` that the reward declared (`Reward.views`); empty for rewards that declare
    none. `step` (the rollout's index in the run: a seed, not the x axis, which counts optimizer
    steps), `rank` (the process)
    and `index` (the group's place in that process's batch) let a reward seed its own draws.
    """

    prompt_ids: list[int]
    response_ids: list[list[int]]
    texts: list[str]
    token_logprobs: list[torch.Tensor]
    token_entropy: list[torch.Tensor]
    token_self_certainty: list[torch.Tensor]
    truth: str | Withheld | None = None
    context_caches: list | None = None
    views: dict[str, Group] = field(default_factory=dict)
    step: int = 0
    rank: int = 0
    index: int = 0

    @property
    def size(self) -> int:
        return len(self.response_ids)

    @property
    def label(self) -> str | None:
        if isinstance(self.truth, Withheld):
            raise LabelWithheldError(
                f"{self.truth.reward} read Group.label: only a reward that sets"
                " `needs_labels = True` is given the label"
            )
        return self.truth


@dataclass
class GroupReward:
    """Rewards for one group.

    `rewards[i]` is response i's training reward. `components` maps a metric name to one value
    per response (logged as the batch mean of `reward/<name>`, NaN entries skipped);
    `group_metrics` holds group-level values (logged as the mean over groups). `scores` is
    the continuous intrinsic score used for AUROC (higher = the reward believes it more).
    `answers[i]` is the extracted answer (None when there is none) and `clusters[i]` the index
    of its answer cluster (-1 without an answer); `verdicts[c]` says whether cluster c passed.
    `details` holds reward-specific per-response data (e.g. CoVo's distance matrices) for
    plots and the score command. `view_rewards[name][j]` is the training reward of response j
    of view `name`, for a reward that trains on its views (`Reward.train_views`).
    """

    rewards: list[float]
    answers: list[str | None]
    clusters: list[int]
    scores: list[float]
    verdicts: list[bool] = field(default_factory=list)
    components: dict[str, list[float]] = field(default_factory=dict)
    group_metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, list] = field(default_factory=dict)
    view_rewards: dict[str, list[float]] = field(default_factory=dict)


class Scorer(Protocol):
    """Policy log-likelihoods of continuations that branch off a sequence.

    `tokenizer` is the policy's tokenizer (rewards tokenise their branches with it).
    `tokens_processed` / `floor_tokens` count the work done since the last `reset_counters()`;
    `reused_tokens` the context tokens read from a `context_cache` instead of being fed.
    """

    tokenizer: object
    tokens_processed: int
    floor_tokens: int
    reused_tokens: int

    def reset_counters(self) -> None: ...

    def branch_nll(
        self,
        context_ids: list[int],
        state_ends: list[int],
        branches: list[list[list[int]]],
        scored_from: list[list[int]],
        context_cache=None,
    ) -> list[torch.Tensor]:
        """Mean NLL of each branch given `context_ids[:state_ends[i]]`.

        `branches[i][k]` is the token list of branch k at state i; only its tokens from
        `scored_from[i][k]` on are averaged. Returns one float32 tensor of shape [K_i] per state.
        `context_cache` (a `covo.rollout.context_cache.ContextCache`) may carry the context's keys
        and values.
        """


class Reward(Protocol):
    """Rewards of one group. A reward that calls the scorer sets `uses_scorer = True`: the
    rollout then keeps the trajectories' keys and values for it (`Group.context_caches`). Only
    a reward that sets `needs_labels = True` (a supervised baseline) is given `Group.label`.

    A reward that compares views of a prompt sets `views`, a mapping from a view's name to a
    prompt template holding `{prompt}`: the rollout samples each view as a group of its own
    and passes it in `Group.views`. Only the original view is trained on unless the reward
    sets `train_views = True` and returns `GroupReward.view_rewards` (see `covo.rollout.views`).
    """

    def __call__(self, group: Group, scorer: Scorer | None) -> GroupReward: ...


def label_for(reward, label: str | None) -> str | Withheld | None:
    """What `reward` is given of a prompt's label (`Group.truth`): the label itself when the
    reward declares `needs_labels`, else `Withheld` naming the reward."""
    return label if getattr(reward, "needs_labels", False) else Withheld(type(reward).__name__)
