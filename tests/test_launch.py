"""`hydra/launcher=slurm`: multirun sweeps as SLURM jobs through submitit (the `slurm` extra)."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from covo.launch.settings import check_train
from covo.launch.train import resolve_auto

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the `slurm` extra")

# No cluster here: `sbatch` answers with a job id, `srun` counts as present and the submitted
# jobs as done. Everything else (Hydra, the launcher plugin, submitit writing the job script)
# is what runs on a cluster.
NO_CLUSTER = """
import runpy, sys
from hydra.core.utils import JobReturn, JobStatus
from submitit.slurm import slurm
slurm.SlurmExecutor._make_submission_command = lambda self, path: ["echo", "Submitted batch job 42"]
slurm.SlurmExecutor.affinity = classmethod(lambda cls: 2)
slurm.SlurmJob.results = lambda self: [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def python(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_slurm_sweep_is_one_array_job_of_nodes_x_gpus(tmp_path):
    python(
        "-c",
        NO_CLUSTER,
        "-m",
        "hydra/launcher=slurm",
        "trainer=gpu",
        "strategy=fsdp",
        "trainer.devices=8",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "seed=1,2,3",
        f"paths.log_dir={tmp_path}",
    )
    (script,) = tmp_path.glob("train/multiruns/*/.submitit/42/42_submission.sh")
    lines = script.read_text().splitlines()
    sbatch = dict(line[len("#SBATCH --") :].split("=", 1) for line in lines if "#SBATCH" in line)
    assert sbatch["nodes"] == "2"
    assert sbatch["ntasks-per-node"] == "8"  # one Lightning process per GPU
    assert sbatch["gpus-per-node"] == "8"
    assert sbatch["partition"] == "gpu"
    assert sbatch["array"] == "0-2%3"  # the three seeds
    assert sbatch["time"] == "1440"
    assert sbatch["job-name"] == "train"
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.endswith("-m submitit.core._submit " + str(script.parents[1] / "%j"))


def test_the_strategy_spans_every_node(tmp_path):
    cfg = compose_config(
        "train",
        ["model=tiny", "strategy=fsdp", "trainer.devices=8", "trainer.num_nodes=2"],
        tmp_path,
    )
    strategy = hydra.utils.instantiate(cfg.strategy)
    assert strategy._data_parallel_size == 16
    assert OmegaConf.select(cfg, "trainer.num_nodes") == 2


def test_num_nodes_is_checked(tmp_path):
    cfg = compose_config("train", ["model=tiny", "trainer.num_nodes=0"], tmp_path)
    resolve_auto(cfg)
    with pytest.raises(ValueError, match=r"^trainer\.num_nodes=0: expected an integer >= 1$"):
        check_train(cfg)


def test_local_launcher_trains_each_sweep_point_as_a_job(tmp_path):
    python(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        "debug=default",
        "seed=0,1",
        "trainer.max_steps=1",
        "threads=1",
        f"paths.log_dir={tmp_path}",
    )
    (sweep,) = (tmp_path / "debug" / "multiruns").iterdir()
    for job in (0, 1):
        (run,) = sweep.glob(f"{job}_*")
        assert f"seed: {job}\n" in (run / "config.yaml").read_text()
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))


MISSING_PLUGIN = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if "submitit" in name else find_spec(name, *a)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_launcher_without_its_extra_is_one_line_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", MISSING_PLUGIN, "-m", "hydra/launcher=slurm", "debug=default"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm needs the `slurm` extra: pip install -e '.[slurm]'"
        " (or `bash scripts/setup.sh slurm`)"
    ]
