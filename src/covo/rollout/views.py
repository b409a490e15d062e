"""Extra views of a prompt that a reward declares: sampling them, and training on them.

A reward lists its views as `views = {name: template}`; a template holds `{prompt}` where the
data's prompt goes (the text before the chat template is applied). The rollout samples every
view as groups of its own (same N, same sampling settings) and hands them to the reward in
`Group.views`. The update trains on the original view only, unless the reward sets
`train_views = True`: then each view's responses join the batch as groups of their own, with
the rewards the reward returned for them in `GroupReward.view_rewards`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from covo.infra.errors import SettingError
from covo.models.loading import LoadedModel
from covo.rewards.base import Group, GroupReward, Withheld
from covo.rollout.groups import make_group
from covo.rollout.sampling import Rollout

PLACEHOLDER = "{prompt}"


def check_views(views: Mapping[str, str] | None) -> dict[str, str]:
    """The views as a plain dict; ValueError naming the view whose template lacks `{prompt}`."""
    checked = {}
    for name, template in dict(views or {}).items():
        if not isinstance(template, str) or PLACEHOLDER not in template:
            raise ValueError(f"reward.views.{name} must be a string holding {PLACEHOLDER}")
        checked[str(name)] = template
    return checked


def declared_views(reward) -> dict[str, str]:
    return check_views(getattr(reward, "views", None))


def all_views(rewards) -> dict[str, str]:
    """The views any of `rewards` declares, by name."""
    return {name: template for r in rewards for name, template in declared_views(r).items()}


def trains_views(reward) -> bool:
    return bool(getattr(reward, "train_views", False)) and bool(declared_views(reward))


def trained_views(rollout: Rollout, reward) -> list[Rollout]:
    """The view rollouts the update trains on, in declaration order (none by default)."""
    return [rollout.views[name] for name in declared_views(reward)] if trains_views(reward) else []


def view_prompts(prompts: list[str], template: str) -> list[str]:
    # replace, not str.format: templates hold LaTeX braces such as \boxed{}
    return [template.replace(PLACEHOLDER, prompt) for prompt in prompts]


def view_groups(
    loaded: LoadedModel,
    prompt: str,
    record: dict,
    views: Mapping[str, str],
    truth: str | Withheld | None,
    keep_cache: bool = False,
) -> dict[str, Group]:
    """The groups of responses given for `views` in `record["views"]` (name -> a list of
    responses, or a record with `responses` and `response_ids` where sampled): `prompt` put
    through each view's template, as the rollout samples them. For the commands that score
    given responses (`covo.score`, `covo.study`)."""
    groups = {}
    for name, template in views.items():
        given = record["views"][name]
        sampled = isinstance(given, dict)
        texts = given["responses"] if sampled else given
        ids = given.get("response_ids") if sampled else None
        [view_prompt] = view_prompts([prompt], template)
        groups[name] = make_group(loaded, view_prompt, texts, truth, ids, keep_cache)
    return groups


def sample_views(
    reward, prompts: list[str], sample: Callable[[list[str]], Rollout]
) -> dict[str, Rollout]:
    """One rollout per declared view; `sample` turns raw prompts into a rollout."""
    return {
        name: sample(view_prompts(prompts, template))
        for name, template in declared_views(reward).items()
    }


def _pad(x: torch.Tensor, left: int, right: int, value=0) -> torch.Tensor:
    return F.pad(x, (left, right), value=value)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts in one batch: prompts left-padded, responses right-padded to
    the longest; per-token values padded with zeros. Keys and values are not carried over."""
    if len({part.group_size for part in parts}) != 1:
        raise ValueError("rollouts with different group sizes cannot share a batch")
    prompt_len = max(part.prompt_len for part in parts)
    response_len = max(part.response_mask.shape[1] for part in parts)

    def joined(part: Rollout, tensor: torch.Tensor, value=0) -> torch.Tensor:
        prompt, response = tensor[:, : part.prompt_len], tensor[:, part.prompt_len :]
        left, right = prompt_len - part.prompt_len, response_len - response.shape[1]
        return torch.cat([_pad(prompt, left, 0, value), _pad(response, 0, right, value)], 1)

    def responses(name: str) -> torch.Tensor | None:
        values = [getattr(part, name) for part in parts]
        if any(v is None for v in values):
            return None
        return torch.cat([_pad(v, 0, response_len - v.shape[1]) for v in values])

    return Rollout(
        sequences=torch.cat([joined(p, p.sequences, pad_id) for p in parts]),
        attention_mask=torch.cat([joined(p, p.attention_mask) for p in parts]),
        response_mask=responses("response_mask"),
        logprobs=responses("logprobs"),
        entropy=responses("entropy"),
        self_certainty=responses("self_certainty"),
        prompt_ids=[ids for part in parts for ids in part.prompt_ids],
        response_ids=[ids for part in parts for ids in part.response_ids],
        texts=[text for part in parts for text in part.texts],
        truncated=torch.cat([part.truncated for part in parts]),
        group_size=parts[0].group_size,
    )


def training_rows(
    rollout: Rollout, rewards: torch.Tensor, results: list[GroupReward], reward, pad_id: int
) -> tuple[Rollout, torch.Tensor]:
    """The rows the update trains on and their rewards: the original view's, followed by each
    view's when the reward trains on its views."""
    if not trains_views(reward):
        return rollout, rewards
    extra = []
    for name in declared_views(reward):
        if any(name not in res.view_rewards for res in results):
            raise SettingError(
                f"reward.train_views is on but the reward gave no rewards for {name}"
            )
        extra.extend(r for res in results for r in res.view_rewards[name])
    merged = concat_rollouts([rollout, *trained_views(rollout, reward)], pad_id)
    view_rewards = torch.tensor(extra, dtype=rewards.dtype, device=rewards.device)
    return merged, torch.cat([rewards, view_rewards])
