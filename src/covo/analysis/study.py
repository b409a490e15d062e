"""Which reward finds the truth? `python -m covo.study model=qwen_coder_05b rewards=[covo,majority]`

Samples N responses for each of M problems once (`covo.analysis.study_samples`: a score-input jsonl,
reused by the same study), then scores them with every reward in `rewards` in one pass: per
prompt the group (token statistics, and the trajectories' keys and values for scorers) is built
once and every reward judges it. Per reward: reward accuracy, AUROC, label accuracy, pass
fraction, time and scorer tokens, where the verdicts go (balanced reward accuracy, precision
and singletons of the passed clusters) and reward by number of states, with bootstrap
intervals over prompts, paired differences against `baseline`, and reward accuracy per bin of
the model's per-prompt accuracy (`covo.analysis.study_metrics`). Labels are read for these
diagnostics only. Writes `study.json` and `reward_accuracy_by_bin.png` into the run directory and
prints the tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from covo.analysis.plots import accuracy_bins_figure, save_figure
from covo.analysis.score import finite, make_group
from covo.analysis.study_metrics import markdown, summarize
from covo.analysis.study_samples import load_or_sample, read_samples
from covo.answers import AnswerEquivalence, get_extractor
from covo.data.jsonl import DataError
from covo.eval.harness import resolve_device
from covo.infra.checks import apply_rules, instantiate
from covo.infra.configs import conf_dir, reward_config
from covo.infra.errors import SettingError, exit_on_user_error
from covo.infra.hardware import set_threads
from covo.metrics.diagnostics import prompt_outcome, verdict_counts
from covo.metrics.states import labelled_counts
from covo.rewards.base import label_for
from covo.rewards.covo.scorer import SCORING_DTYPE_RULE, SCORING_DTYPES, PrefixSharedScorer
from covo.rollout.views import all_views, view_groups

log = logging.getLogger(__name__)
CONF_DIR = conf_dir()
RESULTS_FILE = "study.json"
PLOT_FILE = "reward_accuracy_by_bin.png"


def check(cfg: DictConfig) -> list[str]:
    """The reward names; rejects settings the study cannot use."""
    names = list(cfg.rewards)
    if not names or len(set(names)) != len(names):
        raise SettingError(f"rewards must name distinct reward configs, got {names}")
    if cfg.baseline is not None and cfg.baseline not in names:
        raise SettingError(f"baseline '{cfg.baseline}' is not one of rewards {names}")
    apply_rules(cfg, [SCORING_DTYPE_RULE])
    if "{problem}" not in cfg.prompt_template:
        raise SettingError(f"prompt_template must contain '{{problem}}': {cfg.prompt_template!r}")
    edges = list(cfg.accuracy_bins)
    if len(edges) < 2 or edges != sorted(set(edges)) or edges[0] > 0 or edges[-1] < 1:
        raise SettingError(f"accuracy_bins must rise from <= 0 to >= 1, got {edges}")
    s = cfg.sampling
    if s.num_samples < 2 or s.batch_size < 1 or s.max_new_tokens < 1 or s.temperature <= 0:
        raise SettingError(
            "sampling needs num_samples >= 2, batch_size >= 1, max_new_tokens >= 1 and "
            f"temperature > 0, got {OmegaConf.to_container(s)}"
        )
    return names


def load_problems(cfg: DictConfig) -> list[dict]:
    items = list(hydra.utils.instantiate(cfg.problems))
    if not items:
        raise DataError("problems: no items")
    for n, item in enumerate(items, start=1):
        if item.get("answer") is None:
            raise DataError(f"problems: item {n} has no answer (the study needs labels)")
    return items


class SharedCalls:
    """A scorer that answers a call it already answered for this prompt from memory: rewards
    that score the same branches of the same trajectories (`covo` and `covo_guarded` differ
    only in which clusters pass) feed the model once. Scoring is deterministic, so the values
    are those a second feed would give; the second reward's time and tokens count only what
    it did itself."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.memo: dict = {}

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def new_prompt(self) -> None:
        self.memo.clear()

    def branch_nll(self, context_ids, state_ends, branches, scored_from, context_cache=None):
        key = (
            tuple(context_ids),
            tuple(state_ends),
            tuple(tuple(map(tuple, state)) for state in branches),
            tuple(map(tuple, scored_from)),
        )
        if key not in self.memo:
            self.memo[key] = self.scorer.branch_nll(
                context_ids, state_ends, branches, scored_from, context_cache=context_cache
            )
        return [values.clone() for values in self.memo[key]]


def scored_path(samples: Path, cfg: DictConfig, names: list[str]) -> Path:
    """Where scoring keeps the prompts it finished until the study is written: beside the
    samples, named by a hash of what decides the scores (rewards, extractors, dtype)."""
    key = {
        "rewards": {n: OmegaConf.to_container(reward_config(n), resolve=True) for n in names},
        **{k: cfg[k] for k in ("reward_extractor", "extractor", "scoring_dtype")},
        "prompt_template": cfg.prompt_template,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return samples.with_name(f"{samples.stem}.scored-{digest}.partial")


def score_prompts(
    loaded, rewards: dict, records: list[dict], cfg: DictConfig, partial: Path | None = None
) -> list[dict]:
    """Per prompt: the model's accuracy over its samples and each reward's outcome. With
    `partial`, each finished prompt is appended there, and the prompts already there (an
    interrupted scoring) are read back instead of scored again."""
    done = []
    if partial is not None and partial.exists():
        done = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        done = done[: len(records)]
        if [d["problem"] for d in done] != [r["prompt"] for r in records[: len(done)]]:
            done = []  # scores of other samples: score everything anew
            partial.unlink()
        log.info("Scoring resumes after %d of %d prompts (%s)", len(done), len(records), partial)
    scorer = SharedCalls(
        PrefixSharedScorer(loaded.model, loaded.tokenizer, SCORING_DTYPES[cfg.scoring_dtype])
    )
    keep_cache = any(getattr(reward, "uses_scorer", False) for reward in rewards.values())
    view_templates = all_views(rewards.values())
    extract, equivalence = get_extractor(cfg.extractor), AnswerEquivalence()
    prompts = list(done)
    for n, record in enumerate(records[len(done) :], start=len(done) + 1):
        label, started = str(record["answer"]), time.perf_counter()
        scorer.new_prompt()
        prompt = cfg.prompt_template.format(problem=record["prompt"])
        group = make_group(
            loaded,
            prompt,
            record["responses"],
            None,  # each reward is given what `label_for` allows it below
            record.get("response_ids"),
            keep_cache,
        )
        views = {name: view_templates[name] for name in record.get("views", {})}
        group.views = view_groups(loaded, prompt, record, views, None, keep_cache)
        correct = [equivalence.is_correct(extract(text), label) for text in group.texts]
        entry = {
            "problem": record["prompt"],
            "answer": label,
            "accuracy": sum(correct) / len(correct),
            "group_seconds": time.perf_counter() - started,
            "rewards": {},
        }
        for name, reward in rewards.items():
            scorer.reset_counters()
            started = time.perf_counter()
            res = reward(replace(group, truth=label_for(reward, label)), scorer)
            seconds = time.perf_counter() - started
            o = prompt_outcome(res, label, equivalence)
            entry["rewards"][name] = {
                "hits": sum(o.verdict_hits),
                "clusters": len(o.verdict_hits),
                "label_hit": o.label_hit,
                "num_answers": o.num_answers,
                "scores": o.scores,
                "correct": o.correct,
                "seconds": seconds,
                "scorer_tokens": scorer.tokens_processed,
                **verdict_counts([o]),
                "states": labelled_counts(res, label, equivalence),
            }
        prompts.append(entry)
        if partial is not None:
            with partial.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")
        took = entry["group_seconds"] + sum(r["seconds"] for r in entry["rewards"].values())
        log.info("scored prompt %d/%d in %.1f s", n, len(records), took)
    return prompts


def build_reward(name: str, extractor: str | None):
    """The reward `name`; with `extractor`, every reward that extracts answers uses it."""
    node = reward_config(name)
    if extractor is not None and "extractor" in node:
        node.extractor = extractor
    return instantiate(node)


def study(cfg: DictConfig) -> dict:
    """Sample (or read the samples), score with every reward, summarise; returns the results."""
    names = check(cfg)
    set_threads(cfg.threads)
    rewards = {name: build_reward(name, cfg.reward_extractor) for name in names}
    items = load_problems(cfg)
    loaded = hydra.utils.instantiate(cfg.model)
    loaded.model.to(resolve_device(cfg.device)).eval()
    path, sampled = load_or_sample(loaded, items, cfg)
    records = read_samples(path, items)
    # a reward that compares views of the prompt: their own samples, cached beside
    for name, template in all_views(rewards.values()).items():
        view_path, _ = load_or_sample(loaded, items, cfg, template)
        for record, sampled_view in zip(records, read_samples(view_path, items)):
            record.setdefault("views", {})[name] = sampled_view
    started = time.perf_counter()
    partial = scored_path(path, cfg, names)
    prompts = score_prompts(loaded, rewards, records, cfg, partial)
    scoring_seconds = time.perf_counter() - started
    b = cfg.bootstrap
    summary = summarize(
        prompts, names, cfg.baseline, list(cfg.accuracy_bins), b.resamples, b.confidence, b.seed
    )
    results = {
        "model": loaded.name,
        "samples": str(path),
        "problems": len(prompts),
        "num_samples": cfg.sampling.num_samples,
        "sampling_seconds": sampled.get("seconds"),
        "scoring_seconds": scoring_seconds,
        **summary,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "prompts": prompts,
    }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(finite(results), indent=1, ensure_ascii=False))
    save_figure(accuracy_bins_figure(summary["bins"], names), out / PLOT_FILE)
    partial.unlink(missing_ok=True)
    print(headline(results) + "\n\n" + markdown(summary, cfg.baseline))
    print(f"\nresults: {out / RESULTS_FILE}\nplot: {out / PLOT_FILE}")
    return results


def headline(results: dict) -> str:
    """Model, sizes, the model's accuracy and the wall times."""
    accuracy, sampling = results["model_accuracy"], results["sampling_seconds"]
    prompts = results["prompts"]
    statistics = sum(p["group_seconds"] for p in prompts) / len(prompts)
    return (
        f"{results['model']}: {results['problems']} problems x {results['num_samples']} "
        f"samples, model accuracy {accuracy['value']:.3f} [{accuracy['low']:.3f}, "
        f"{accuracy['high']:.3f}]\nsampling "
        + (f"{sampling:.0f} s" if sampling is not None else "time not recorded")
        + f", scoring {results['scoring_seconds']:.0f} s (token statistics and keys/values "
        f"{statistics:.2f} s per problem, then the rewards); samples: {results['samples']}"
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="study")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    study(cfg)


if __name__ == "__main__":
    main()
