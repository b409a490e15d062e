"""A lab's premise profile: `covo.study` on the lab's own held-out split, in one row.

    taskset -c 0 python scripts/lab_profile.py model=toy_calibrated data=toy_calibrated
    python scripts/lab_profile.py --from logs/study/runs/<time>/study.json   # a finished study
    python scripts/lab_profile.py --table a/study.json b/study.json   # studies side by side
    python -m covo.study model=smollm2_135m threads=1 reward_extractor=boxed_or_last_number \
        'rewards=[majority,covo,seq_logprob]'     # a real model (then --from its study.json)

The study samples N responses per problem at T = 1 on the first `problems` problems of the
data config's validation split (its prompt template; answers read as `\\boxed{}`), scores them
with majority, covo and seq_logprob, and the row says what decides a label-free reward's
signal: the sampled accuracy, pass@N, how much more often the majority answer is right than
one sample (majority label accuracy), how well the vote share and CoVo's score rank right
answers above wrong ones (AUROC), and how many states (CoVo's steps) a response has.
Other `key=value` arguments are the study's overrides (`rewards=[...]`, `sampling.*`).
`--table` prints finished studies of the same problems (models of different sizes) as one
markdown table: the model's accuracy and each reward's AUROC with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from covo.analysis.study import study
from covo.analysis.study_metrics import cell, table
from covo.infra.configs import conf_dir
from covo.rewards.covo.segmentation import step_ends

REWARDS = ["majority", "covo", "seq_logprob"]


def study_config(model: str, data: str, problems: int, out: Path, overrides: list[str]):
    """The study config of `model` on `data`'s validation problems, as training prompts them;
    its results go to `out`."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        run = compose("train", [f"model={model}", f"data={data}"])
        cfg = compose(
            "study",
            [
                f"model={model}",
                "threads=1",
                "device=cpu",
                f"rewards=[{','.join(REWARDS)}]",
                "baseline=majority",
                "extractor=boxed",
                "reward_extractor=boxed",
                f"sampling.max_new_tokens={run.rollout.max_new_tokens}",
                "sampling.batch_size=64",
                f"paths.output_dir={out}",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.problems = OmegaConf.to_container(run.data.val, resolve=True)
        cfg.problems.num_problems = problems
        cfg.prompt_template = (
            run.data.prompt_template.replace("{", "{{")
            .replace("}", "}}")
            .replace("{{problem}}", "{problem}")
        )
    return cfg


def mean_states(samples: Path, tokenizer) -> float:
    """Mean number of CoVo states (`step_ends`) per sampled response."""
    counts = []
    for line in samples.read_text().splitlines():
        for ids in json.loads(line)["response_ids"]:
            counts.append(len(step_ends([tokenizer.decode([i]) for i in ids])) if ids else 0)
    return sum(counts) / len(counts)


def profile(results: dict, states: float | None) -> dict:
    accuracy = [p["accuracy"] for p in results["prompts"]]
    rewards = results["rewards"]
    row = {
        "model": results["model"],
        "problems": len(accuracy),
        "samples": results["num_samples"],
        "sampled_accuracy": sum(accuracy) / len(accuracy),
        f"pass@{results['num_samples']}": sum(a > 0 for a in accuracy) / len(accuracy),
        "mean_states": states,
    }
    for name in ("majority", "covo", "seq_logprob"):
        if name in rewards:
            row[f"{name}_auroc"] = rewards[name]["auroc"]["value"]
    if "majority" in rewards:
        row["majority_label_accuracy"] = rewards["majority"]["label_accuracy"]["value"]
        row["majority_gain"] = row["majority_label_accuracy"] - row["sampled_accuracy"]
    return row


def side_by_side(studies: list[dict]) -> str:
    """Markdown: a row per study (model and the dtype it sampled and scored in, sampled
    accuracy, sampling and scoring minutes) and a column per reward any of them ran (its
    AUROC; `-` where a study did not run it)."""
    rewards = list(dict.fromkeys(r for s in studies for r in s["rewards"]))
    head = ["model", "sampled accuracy", *(f"{r} AUROC" for r in rewards), "sampling, scoring min"]
    rows = []
    for s in studies:
        aurocs = [cell(s["rewards"][r]["auroc"]) if r in s["rewards"] else "-" for r in rewards]
        minutes = f"{s['sampling_seconds'] / 60:.0f}, {s['scoring_seconds'] / 60:.0f}"
        weights = s["config"].get("model", {}).get("master_dtype", "float32")
        rows.append([f"{s['model']} ({weights})", cell(s["model_accuracy"]), *aurocs, minutes])
    return table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="model=NAME data=NAME and study overrides")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--from", dest="done", type=Path, help="a finished study.json")
    parser.add_argument("--table", nargs="+", type=Path, help="finished study.json files")
    parser.add_argument("--out", type=Path, default=Path("logs/study/lab_profile"),
                        help="where the study writes study.json")  # fmt: skip
    args = parser.parse_args()
    if args.table:
        print(side_by_side([json.loads(path.read_text()) for path in args.table]))
        return
    if args.done:  # states too where its samples are still there (its model is loaded)
        results, states = json.loads(args.done.read_text()), None
        samples = Path(results["samples"])
        if samples.is_file():
            model = OmegaConf.create(results["config"]["model"])
            states = mean_states(samples, instantiate(model).tokenizer)
    else:
        named = dict(
            o.split("=", 1) for o in args.overrides if o.split("=")[0] in ("model", "data")
        )
        rest = [o for o in args.overrides if o.split("=")[0] not in ("model", "data")]
        cfg = study_config(named["model"], named["data"], args.problems, args.out, rest)
        results = study(cfg)
        tokenizer = instantiate(cfg.model).tokenizer
        states = mean_states(Path(results["samples"]), tokenizer)
    print(json.dumps(profile(results, states)))


if __name__ == "__main__":
    main()
