"""`hparams_search=covo_optuna`: an Optuna search over the run (the `optuna` extra)."""

from __future__ import annotations

import importlib.abc
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, TINY_RUN
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from covo.infra.errors import exit_on_missing_launcher
from covo.launch.train import optimized_value

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the `optuna` extra")

SEARCH = ROOT / "conf" / "hparams_search" / "covo_optuna.yaml"


def searched(interval: str) -> tuple[float, float]:
    """`tag(log, interval(a, b))` or `interval(a, b)` -> (a, b)."""
    inside = interval[interval.rindex("interval(") + len("interval(") :].split(")")[0]
    low, high = (float(x) for x in inside.split(","))
    return low, high


def test_the_search_composes_over_keys_the_run_has():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hparams_search=covo_optuna"], return_hydra_config=True)
    assert cfg.optimized_metric == "val/accuracy_best"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.storage is None
    assert set(sweeper.params) == {"optimizer.lr", "algorithm.kl_coef", "rollout.temperature"}
    for key, interval in sweeper.params.items():
        low, high = searched(interval)
        default = OmegaConf.select(cfg, key)  # 2e-6, 1e-4, 1.0: the default run is searched
        assert low < default < high, key


def test_optimized_value_names_a_metric_the_run_did_not_log():
    result = {"metrics": {"val/accuracy": 0.25, "val/accuracy_best": 0.5}}
    assert optimized_value(result, "val/accuracy_best") == 0.5
    with pytest.raises(ValueError, match="optimized_metric: 'val/acc' was not logged"):
        optimized_value(result, "val/acc")


@pytest.mark.slow  # 13 s alone on one core, 33-41 s on a busy machine
def test_two_trials_return_their_metric_to_the_sweeper(tmp_path):
    # train/lr as the objective: with 2 steps and a 1-step warm-up, the last logged lr is the
    # peak, the trial's sampled optimizer.lr, so the best trial is the one with the largest lr
    overrides = [o for o in TINY_RUN if not o.startswith("logger=")]
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "hparams_search=covo_optuna",
            "hydra.sweeper.n_trials=2",
            "optimized_metric=train/lr",
            *overrides,
            "val_every_n_rollouts=1",
            "threads=1",
            "callbacks=none",
            "logger=none",
            "export_dir=null",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = tmp_path.glob("train/multiruns/*")
    trials = [yaml.safe_load((sweep / str(n) / "config.yaml").read_text()) for n in (0, 1)]
    lrs = [trial["optimizer"]["lr"] for trial in trials]
    assert lrs[0] != lrs[1]
    for trial in trials:
        low, high = searched(SEARCH.read_text().split("optimizer.lr:")[1].splitlines()[0])
        assert low <= trial["optimizer"]["lr"] <= high
        assert 0.6 <= trial["rollout"]["temperature"] <= 1.2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(lrs), rel=1e-6)
    assert best["best_params"]["optimizer.lr"] == pytest.approx(max(lrs), rel=1e-9)


class HidePlugin(importlib.abc.MetaPathFinder):
    """The Optuna sweeper plugin as where the extra is not installed."""

    def find_spec(self, name, path, target=None):
        if name.startswith("hydra_plugins.hydra_optuna_sweeper"):
            raise ModuleNotFoundError(name)


def test_a_search_without_the_extra_names_it(monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("hydra_plugins.hydra_optuna_sweeper")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [HidePlugin(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_:
        exit_on_missing_launcher(["model=tiny", "hparams_search=covo_optuna"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: hparams_search=covo_optuna needs the `optuna` extra: pip install -e '.[optuna]'"
        " (or `bash scripts/setup.sh optuna`)"
    ]
    exit_on_missing_launcher(["model=tiny"])  # nothing asked of the plugin: no exit
