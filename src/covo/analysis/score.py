"""Explain a reward on given responses: `python -m covo.score input=in.jsonl output=out.jsonl`.

Input lines `{"prompt": str, "responses": [str, ...], "answer": str (optional), "response_ids":
[[int, ...], ...] (optional), "views": {name: [str, ...]} (for a reward that compares views of
the prompt, self_harmony: the responses to the prompt put through each view)}`. The prompt goes
through `prompt_template` and the model's chat template; each response is tokenised on its own
unless its sampled ids are given.
Per-token log-probs, entropy and self-certainty come from no-grad forwards over prompt +
responses (`covo.rollout.groups`), so curiosity and the certainty rewards see real values.
Each output line holds the answer clusters and, per response, its steps, distance matrix
D [T][K], ratios, Con, Vol, curiosity and reward; `dump_ids=true` adds every token id needed
to recompute D. The answer is read for diagnostics only (correctness, reward accuracy,
AUROC, the distance-curve plot).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

from covo.analysis.plots import distance_curve_figure, save_figure
from covo.answers import AnswerEquivalence
from covo.data.jsonl import DataError, json_objects
from covo.eval.harness import resolve_device
from covo.infra.configs import conf_dir
from covo.infra.errors import SettingError, exit_on_user_error
from covo.infra.hardware import set_threads
from covo.launch.settings import check_score
from covo.metrics.diagnostics import distance_curves, reward_diagnostics
from covo.metrics.states import labelled_counts, pool, state_metrics, states_table
from covo.rewards.base import Group, GroupReward, label_for
from covo.rewards.covo.reward import CoVoReward
from covo.rewards.covo.scorer import SCORING_DTYPES, PrefixSharedScorer
from covo.rollout.groups import make_group
from covo.rollout.views import declared_views, view_groups

CONF_DIR = conf_dir()
COMPONENTS = ("consistency", "volatility", "curiosity")


def read_records(path: Path, views: Sequence[str] = ()) -> Iterator[dict]:
    """One record per non-blank line, read lazily; a bad line raises `DataError` naming it.
    `views`: the views the reward compares, each a list of responses in the line's `views`."""
    for where, record in json_objects(path, ["prompt", "responses"], what="input file"):
        for name in views:
            given = (record.get("views") or {}).get(name)
            if not (isinstance(given, list) and given and all(isinstance(r, str) for r in given)):
                raise DataError(
                    f"{where}: 'views.{name}' must list the responses to the prompt put through "
                    f"the reward's view {name!r}"
                )
        if not isinstance(record["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string")
        responses = record["responses"]
        if not (isinstance(responses, list) and responses):
            raise DataError(f"{where}: 'responses' must be a non-empty list")
        if not all(isinstance(r, str) for r in responses):
            raise DataError(f"{where}: every response must be a string")
        ids = record.get("response_ids")
        if ids is not None and not (
            isinstance(ids, list)
            and len(ids) == len(responses)
            and all(isinstance(row, list) and all(type(t) is int for t in row) for row in ids)
        ):
            raise DataError(f"{where}: 'response_ids' must hold one list of token ids per response")
        yield record


def finite(value):
    """`value` with every non-finite float (NaN: not computed) replaced by None, for JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def step_texts(tokenizer, ids: list[int], ends: list[int] | None) -> list[str] | None:
    """Decoded text of each step, the token spans `ids[ends[k - 1]:ends[k]]`."""
    if ends is None:
        return None
    starts = [0, *ends[:-1]]
    return [
        tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for a, b in zip(starts, ends)
    ]


def per_response(source: dict[str, list], name: str, i: int):
    """Entry i of `source[name]`; None when the reward does not produce `name`."""
    return source[name][i] if name in source else None


def explain(
    prompt: str,
    group: Group,
    res: GroupReward,
    tokenizer,
    equivalence: AnswerEquivalence,
    label: str | None,
) -> dict:
    """The output record of one group (`prompt` as given, `label` the data's answer): its
    answer clusters and per-response details.

    A cluster's `value` is the mean of its members' scores (CoVo: the aggregated Con / Vol
    value); `verdict` is None for a reward that passes none. `correct` (from the label) is
    there only when the item has a label.
    """
    k = max(res.clusters, default=-1) + 1
    clusters = []
    for c in range(k):
        members = [i for i, ci in enumerate(res.clusters) if ci == c]
        cluster = {
            "answer": res.answers[members[0]],
            "members": members,
            "value": math.fsum(res.scores[i] for i in members) / len(members),
            "verdict": bool(res.verdicts[c]) if len(res.verdicts) == k else None,
        }
        if label is not None:
            cluster["correct"] = equivalence.is_correct(cluster["answer"], label)
        clusters.append(cluster)
    responses = []
    for i, ids in enumerate(group.response_ids):
        ends = per_response(res.details, "step_ends", i)
        response = {
            "answer": res.answers[i],
            "cluster": res.clusters[i],
            "reward": res.rewards[i],
            "score": res.scores[i],
            **{n: per_response(res.components, n, i) for n in COMPONENTS},
            "steps": step_texts(tokenizer, ids, ends),
            "step_ends": ends,
            **{n: per_response(res.details, n, i) for n in ("state_ends", "D", "ratios")},
        }
        if label is not None:
            response["correct"] = equivalence.is_correct(res.answers[i], label)
        responses.append(response)
    echo = {"prompt": prompt, **({"answer": label} if label is not None else {})}
    return {**echo, "clusters": clusters, "responses": responses}


def add_ids(record: dict, group: Group, branch_ids: dict[str, list] | None) -> dict:
    """`record` with the prompt and response ids, and the branch ids of a CoVo reward
    (`CoVoReward.branch_ids`: template, one branch per cluster, the newline prefix)."""
    ids = {"prompt_ids": group.prompt_ids}
    for response, response_ids in zip(record["responses"], group.response_ids):
        response["response_ids"] = response_ids
    if branch_ids is not None:
        ids.update(template_ids=branch_ids["template_ids"], newline_ids=branch_ids["newline_ids"])
        for cluster, answer_ids in zip(record["clusters"], branch_ids["answer_ids"]):
            cluster["answer_ids"] = answer_ids
    return {**ids, **record}


def plot_curves(results: list[GroupReward], labels: list, equivalence, path: str) -> None:
    """Save the distance curves, correct vs incorrect, or say why there are none."""
    curves = distance_curves(results, labels, equivalence)
    if curves["correct_trajectories"] + curves["incorrect_trajectories"] == 0:
        print("plot skipped: it needs answers and distance ratios (CoVo with >= 2 answers)")
        return
    save_figure(distance_curve_figure(curves), path)
    print(f"plot: {path}")


def print_verdicts(summary: dict[str, float]) -> None:
    """Where the verdicts went, then reward accuracy and AUROC (nan: nothing to count)."""

    def get(name: str) -> float:
        return summary.get(f"diag/{name}", math.nan)

    print(
        f"passed clusters: correct {get('pass_precision'):.4f}, singletons "
        f"{get('singleton_pass_share'):.4f}; correct clusters passed "
        f"{get('correct_pass_rate'):.4f}, wrong ones rejected {get('wrong_reject_rate'):.4f}: "
        f"balanced reward accuracy {get('balanced_reward_accuracy'):.4f}"
    )
    print(f"reward accuracy {get('reward_accuracy'):.4f}, AUROC {get('auroc'):.4f}")


def print_states(results: list[GroupReward], labels: list, equivalence) -> None:
    """The table of reward by number of states, for a reward that counts states."""
    counts = pool([labelled_counts(res, lab, equivalence) for res, lab in zip(results, labels)])
    if any(responses for responses, _, _ in counts.values()):
        with_correct = all(label is not None for label in labels)
        print(
            "reward by number of states (scored responses)\n" + states_table(counts, with_correct)
        )


def summarize(results: list[GroupReward], labels: list, equivalence) -> dict[str, float]:
    """Counts, mean reward, the `diag/...` metrics (most need labels); prints them."""
    rewards = [r for res in results for r in res.rewards]
    summary = {
        "prompts": len(results),
        "responses": len(rewards),
        "mean_reward": math.fsum(rewards) / len(rewards),
        **state_metrics(results),
    }
    print_states(results, labels, equivalence)
    if any(label is not None for label in labels):
        summary.update(reward_diagnostics(results, labels, equivalence))
        print_verdicts(summary)
    print(
        f"scored {summary['prompts']} prompts, {summary['responses']} responses, "
        f"mean reward {summary['mean_reward']:.4f}"
    )
    return summary


def score(cfg: DictConfig) -> dict[str, float]:
    """Score every input line, writing (and flushing) its output line before reading the next.

    Returns the summary: `prompts`, `responses`, `mean_reward` and `diag/...` (most of them
    with labels only).
    """
    reward = check_score(cfg)  # built before the model: it needs none
    set_threads(cfg.threads)
    if "{problem}" not in cfg.prompt_template:
        raise SettingError(f"prompt_template must contain '{{problem}}': {cfg.prompt_template!r}")
    source, target = Path(cfg.input).expanduser(), Path(cfg.output).expanduser()
    if target.resolve() == source.resolve():
        raise SettingError(f"output would overwrite the input: {target}")
    loaded = hydra.utils.instantiate(cfg.model)
    loaded.model.to(resolve_device(cfg.device)).eval()
    tokenizer = loaded.tokenizer
    scorer = PrefixSharedScorer(loaded.model, tokenizer, SCORING_DTYPES[cfg.scoring_dtype])
    equivalence = getattr(reward, "equivalence", None) or AnswerEquivalence()
    views = declared_views(reward)
    results, labels = [], []
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as out:
        for index, item in enumerate(read_records(source, list(views))):
            label = None if item.get("answer") is None else str(item["answer"])
            prompt = cfg.prompt_template.format(problem=item["prompt"])
            truth = label_for(reward, label)
            group = make_group(loaded, prompt, item["responses"], truth, item.get("response_ids"))
            group.views = view_groups(loaded, prompt, item, views, truth)
            group.index = index  # each line its own group (the random control draws afresh)
            res = reward(group, scorer)
            record = explain(item["prompt"], group, res, tokenizer, equivalence, label)
            if cfg.dump_ids:
                branch_ids = None
                if isinstance(reward, CoVoReward):
                    branch_ids = reward.branch_ids(tokenizer, res.details["representatives"])
                record = add_ids(record, group, branch_ids)
            out.write(json.dumps(finite(record), ensure_ascii=False) + "\n")
            out.flush()
            results.append(res)
            labels.append(label)
    if not results:
        raise DataError(f"{source}: no items")
    summary = summarize(results, labels, equivalence)
    if cfg.plot:
        plot_curves(results, labels, equivalence, cfg.plot)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="score")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    score(cfg)


if __name__ == "__main__":
    main()
