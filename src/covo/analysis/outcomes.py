"""Which reward, used for training, makes the model better?
`python -m covo.analysis.outcomes train.model=tiny rewards=[ground_truth,majority] seeds=5`

Trains every reward of `rewards` (covo's, or a YAML in a folder of the study's `hydra.searchpath`,
which every run gets too) with every seed, each run its own `python train.py` process pinned to
one core (`taskset -c`, `threads=1`), `jobs` at once, with the held-out evaluation
callback (`callbacks=heldout_eval`: sampled accuracy at T = 1, greedy accuracy and maj@N at
step 0 and every `eval_every` optimizer steps). A run is finished when its `result.json`
exists; rerunning the same command skips those and resumes the others from their last
checkpoint. Then per reward: accuracy gain at the end and at the peak, the peak step, the first
step `fall` (0.05) below the running peak (fall step, over the runs that fell) and the
collapse guard's first alarm step with 95% t-intervals over seeds, paired differences against
each of `baselines`, and for the guard the alarm against the first 5-point fall of held-out
accuracy (`covo.analysis.outcome_metrics`). Writes `outcomes.json` and `learning_curves.png`
into the study folder and prints the tables.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from covo.analysis.outcome_metrics import aggregate, guard_markdown, markdown, replayed_guards
from covo.analysis.plots import learning_curves_figure, save_figure
from covo.analysis.report import read_scalars
from covo.analysis.score import finite
from covo.callbacks.heldout_eval import read_records
from covo.infra.configs import compose_run, conf_dir, reward_config, searchpath_override
from covo.infra.errors import SettingError, exit_on_user_error
from covo.launch.settings import check_train
from covo.launch.train import resolve_auto

log = logging.getLogger(__name__)
CONF_DIR = conf_dir()
RESULT_FILE = "result.json"
HELDOUT_FILE = "heldout.jsonl"
RESULTS_FILE = "outcomes.json"
PLOT_FILE = "learning_curves.png"
# the collapse signals kept in each run's result (to replay other guard rules on them)
SIGNALS = (
    "alarm",
    "rules_met",
    "top_answer_share",
    "answer_entropy",
    "distinct_answers",
    "token_entropy",
    "self_certainty",
    "zero_var_frac",
    "len_mean",
    "kl",
)


def seed_list(seeds) -> list[int]:
    """`seeds: n` -> 0..n-1; a list stays itself."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise SettingError(f"seeds must be >= 1 (or a list of seeds), got {seeds}")
        return list(range(seeds))
    values = list(seeds)
    if not values or len(set(values)) != len(values) or not all(isinstance(s, int) for s in values):
        raise SettingError(
            f"seeds must be a count >= 1 or a list of distinct integers, got {values}"
        )
    return values


def run_overrides(cfg: DictConfig, reward: str, seed: int) -> list[str]:
    """What `python train.py` gets for one run (without its output folder or checkpoint)."""
    return [
        f"model={cfg.train.model}",
        f"data={cfg.train.data}",
        f"trainer.max_steps={cfg.train.steps}",
        f"callbacks.heldout_eval.every_n_optimizer_steps={cfg.eval_every}",
        *cfg.train.overrides,
        *cfg.train.extra,
        f"reward={reward}",
        f"seed={seed}",
    ]


def check(cfg: DictConfig) -> tuple[list[str], list[int]]:
    """The rewards and seeds; rejects, before any run starts, what no run could use."""
    if OmegaConf.is_missing(cfg.train, "model"):
        raise SettingError(
            "train.model is missing: name a conf/model option, e.g. train.model=tiny"
        )
    names = list(cfg.rewards)
    if not names or len(set(names)) != len(names):
        raise SettingError(f"rewards must name distinct reward configs, got {names}")
    for name in names:
        reward_config(name)  # from covo's conf/ or the study's hydra.searchpath
    seeds = seed_list(OmegaConf.to_object(cfg.seeds) if OmegaConf.is_list(cfg.seeds) else cfg.seeds)
    for key in ("eval_every", "train.steps", "jobs"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise SettingError(f"{key} must be an integer >= 1, got {value}")
    for key in ("fall", "confidence"):
        if not 0 < cfg[key] < 1:
            raise SettingError(f"{key} must be in (0, 1), got {cfg[key]}")
    for name in names:  # the whole run config, as train.py would compose and check it
        try:
            train_cfg = compose_run("train", run_overrides(cfg, name, seeds[0]))
        except HydraException as err:
            first = str(err).strip().splitlines()[0]
            raise SettingError(f"train (model, data, overrides, extra): {first}") from None
        train_cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / "check")
        resolve_auto(train_cfg)
        check_train(train_cfg)
    return names, seeds


def run_dir(study_dir: Path, reward: str, seed: int) -> Path:
    return study_dir / "runs" / reward / f"seed_{seed}"


def policy_steps(optimizer_steps: list[tuple[int, float]], batches: list[int]) -> list[int]:
    """The optimizer steps taken before each rollout `batches[i]` (the guard logs per rollout;
    a rollout whose groups were all filtered takes no step and logs no `train/optimizer_steps`)."""
    return [int(sum(n for b, n in optimizer_steps if b < batch)) for batch in batches]


def first_alarm(alarm: list[tuple[int, float]], optimizer_steps: list[tuple[int, float]]):
    """The first raised alarm, in optimizer steps: those of the policy whose rollout raised it
    (the axis of the held-out curve); None when the alarm never went up."""
    batch = next((step for step, value in alarm if value >= 0.5), None)
    return None if batch is None else policy_steps(optimizer_steps, [batch])[0]


def collect(directory: Path, reward: str, seed: int) -> dict:
    """A finished run's held-out curve, first alarm and collapse signals (per rollout, with
    the optimizer step of the policy that sampled it under `signals.step`)."""
    scalars = read_scalars(directory)
    stepped = scalars.get("train/optimizer_steps", [])
    signals = {
        name: scalars[f"collapse/{name}"] for name in SIGNALS if f"collapse/{name}" in scalars
    }
    batches = [b for b, _ in signals.get("alarm", [])]
    return {
        "reward": reward,
        "seed": seed,
        "curve": read_records(directory / HELDOUT_FILE, split="validation"),
        "alarm_step": first_alarm(scalars.get("collapse/alarm", []), stepped),
        "signals": signals | {"step": list(zip(batches, policy_steps(stepped, batches)))},
    }


def train_command(cfg: DictConfig, reward: str, seed: int, directory: Path, core: int) -> list:
    command = ["taskset", "-c", str(core), sys.executable, "-m", "covo", "train"]
    command += run_overrides(cfg, reward, seed) + searchpath_override()
    command += [f"hydra.run.dir={directory}"]
    last = directory / "checkpoints" / "last.ckpt"
    return command + ([f"ckpt_path={last}"] if last.is_file() else [])


def launch(command: list[str], log_path: Path) -> int:
    """One training process, its output appended to `log_path`; returns its exit status."""
    with log_path.open("a") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode


def run_all(cfg: DictConfig, names: list[str], seeds: list[int], study_dir: Path) -> list[str]:
    """Every unfinished run, `jobs` at a time, each pinned to a free core; returns the runs
    that failed."""
    cores = list(cfg.cores) if cfg.cores is not None else sorted(os.sched_getaffinity(0))
    free: queue.Queue = queue.Queue()
    for n in range(cfg.jobs):
        free.put(cores[n % len(cores)])
    pending = [
        (reward, seed)
        for seed in seeds
        for reward in names
        if not (run_dir(study_dir, reward, seed) / RESULT_FILE).is_file()
    ]
    log.info("%d of %d runs to train", len(pending), len(names) * len(seeds))

    def one(reward: str, seed: int) -> str | None:
        directory = run_dir(study_dir, reward, seed)
        directory.mkdir(parents=True, exist_ok=True)
        core = free.get()
        try:
            command = train_command(cfg, reward, seed, directory, core)
            log.info("start %s seed %d on core %d", reward, seed, core)
            status = launch(command, directory / "train.log")
        finally:
            free.put(core)
        if status != 0:
            log.error("%s seed %d failed (exit %d): %s", reward, seed, status, directory)
            return f"{reward} seed {seed} (exit {status}, log {directory / 'train.log'})"
        result = collect(directory, reward, seed)
        (directory / RESULT_FILE).write_text(json.dumps(finite(result)))
        log.info("done %s seed %d", reward, seed)
        return None

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        failed = list(pool.map(lambda run: one(*run), pending))
    return [f for f in failed if f is not None]


def finished_runs(names: list[str], seeds: list[int], study_dir: Path) -> list[dict]:
    paths = [run_dir(study_dir, r, s) / RESULT_FILE for s in seeds for r in names]
    return [json.loads(p.read_text()) for p in paths if p.is_file()]


def outcomes(cfg: DictConfig) -> dict:
    """Train what is not finished, then aggregate, write and print the results."""
    names, seeds = check(cfg)
    study_dir = Path(cfg.paths.output_dir)
    failed = run_all(cfg, names, seeds, study_dir) if cfg.launch else []
    runs = finished_runs(names, seeds, study_dir)
    if not runs:
        raise RuntimeError(f"no run finished; see the train.log files under {study_dir}/runs")
    baselines = list(cfg.baselines)
    results = aggregate(runs, names, baselines, cfg.fall, cfg.confidence)
    guards = OmegaConf.to_container(cfg.guards, resolve=True)
    replayed = replayed_guards(runs, guards, names, cfg.fall, cfg.confidence)
    results |= {
        "replayed_guards": replayed,
        "runs": runs,
        "failed": failed,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (study_dir / RESULTS_FILE).write_text(json.dumps(finite(results), indent=1))
    curves = {name: s["curve"] for name, s in results["rewards"].items() if s["runs"]}
    figure = learning_curves_figure(curves, "held-out sampled accuracy (T = 1), mean over seeds")
    save_figure(figure, study_dir / PLOT_FILE)
    done = len(runs)
    print(
        f"{cfg.train.model} on {cfg.train.data}, {cfg.train.steps} optimizer steps, {done} of "
        f"{len(names) * len(seeds)} runs finished; gains in held-out sampled accuracy (T = 1) "
        f"from step 0, 95% t-intervals over seeds; a fall is {cfg.fall:g} below the running "
        f"peak\n\n{markdown(results, baselines)}"
    )
    for name, replay in replayed.items():
        print(f"\nthe guard replayed with `{name}` {replay['guard']}:\n")
        print(guard_markdown(replay["rewards"]))
    for line in failed:
        print(f"failed: {line}")
    print(f"\nresults: {study_dir / RESULTS_FILE}\nplot: {study_dir / PLOT_FILE}")
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="outcomes")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    outcomes(cfg)


if __name__ == "__main__":
    main()
