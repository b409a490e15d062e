"""Every logger records the run's scalars, and `metrics.jsonl` is written whatever the logger."""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import open_dict

from covo.analysis.report import read_scalars
from covo.eval.results import write_scalars
from covo.infra.errors import DataError, SettingError
from covo.launch.train import train
from covo.metrics import loggers
from covo.metrics.loggers import JsonlLogger


def test_jsonl_lines_are_read_back_with_the_later_value_of_a_step(tmp_path):
    logger = JsonlLogger(tmp_path)
    logger.log_metrics({"reward/mean": 0.25, "train/kl": 0.5}, step=0)
    logger.log_metrics({"reward/mean": 0.75}, step=1)
    logger.log_metrics({"reward/mean": 0.5}, step=1)  # a resumed run logs step 1 again
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[0] == (
        '{"step": 0, "reward/mean": 0.25, "train/kl": 0.5}'
    )
    assert read_scalars(tmp_path) == {"reward/mean": [(0, 0.25), (1, 0.5)], "train/kl": [(0, 0.5)]}


def test_a_broken_jsonl_line_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward/mean": 0.5}\n{"step": 1, \n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_scalars(tmp_path)


def test_eval_scalars_reach_metrics_jsonl(tmp_path):
    totals = {"gsm8k": {"items": 8, "pass@1": 0.375}, "math500": {"items": 4, "pass@1": 0.25}}
    write_scalars(totals, tmp_path, step=30)
    scalars = read_scalars(tmp_path)
    assert scalars["eval/gsm8k/pass@1"] == [(30, 0.375)]
    assert scalars["eval/mean/pass@1"] == [(30, 0.3125)]  # (0.375 + 0.25) / 2
    assert "eval/gsm8k/items" not in scalars


def run(tmp_path, logger: str, extra=()) -> dict:
    cfg = compose_config(
        "train",
        ["debug=default", f"logger={logger}", f"paths.log_dir={tmp_path / 'logs'}", *extra],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.trainer.max_steps = 2
    return train(cfg)


def jsonl_reward(out: dict) -> list[float]:
    return [
        record["reward/mean"]
        for record in map(json.loads, Path(out["metrics_file"]).read_text().splitlines())
        if "reward/mean" in record
    ]


def test_logger_csv_run_is_read_by_report(tmp_path):
    out = run(tmp_path, "csv")
    run_dir = tmp_path / "run"
    assert not list(run_dir.rglob("events.out.tfevents.*"))
    with open(f"{out['csv_dir']}/metrics.csv") as f:
        from_csv = [
            (int(row["step"]), float(row["reward/mean"])) for row in csv.DictReader(f)
            if row.get("reward/mean")
        ]  # fmt: skip
    reported = read_scalars(run_dir)["reward/mean"]
    assert [step for step, _ in reported] == [step for step, _ in from_csv] == [0, 1]
    assert [value for _, value in reported] == pytest.approx([value for _, value in from_csv])


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="the mlflow extra")
def test_logger_mlflow_records_reward_mean_in_a_local_store(tmp_path):
    out = run(tmp_path, "mlflow")
    (path,) = glob.glob(f"{out['mlflow_dir']}/*/*/metrics/reward/mean")
    # MLflow's file store: one "<timestamp> <value> <step>" line per point
    points = [line.split() for line in Path(path).read_text().splitlines()]
    assert [int(step) for _, _, step in points] == [0, 1]
    assert [float(value) for _, value, _ in points] == pytest.approx(jsonl_reward(out))
    (table,) = glob.glob(f"{out['mlflow_dir']}/*/*/artifacts/samples/step_000000.md")
    assert Path(table).read_text().startswith("| prompt | label | response | answer | reward |")


def wandb_records(path: str):
    """The records of an offline W&B run file: a 7-byte header, then 32 KiB blocks of chunks
    (crc32 4, length 2, type 1: full, first, middle, last) as in LevelDB's log format."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks = Path(path).read_bytes(), 32768, 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the wandb extra")
def test_logger_wandb_offline_records_reward_mean(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run(tmp_path, "wandb")
    (path,) = glob.glob(f"{tmp_path}/run/wandb/offline-run-*/*.wandb")
    # W&B's service writes the file on its own: wait for the run's exit record
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert time.monotonic() < deadline, "the offline run file never got its exit record"
        time.sleep(0.5)
    history = [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }  # fmt: skip
        for record in wandb_records(path)
        if record.WhichOneof("record_type") == "history"
    ]
    rewards = [(h["trainer/global_step"], h["reward/mean"]) for h in history if "reward/mean" in h]
    assert [step for step, _ in rewards] == [0, 1]
    assert [value for _, value in rewards] == pytest.approx(jsonl_reward(out))
    tables = [h for h in history if h.get("samples/_type") == "table-file"]
    assert tables and tables[0]["samples/ncols"] == 5


def test_logger_many_and_a_list_compose(tmp_path):
    many = compose_config("train", ["logger=many"], tmp_path)
    assert list(many.logger) == ["tensorboard", "csv", "wandb"]
    chosen = compose_config("train", ["logger=[tensorboard,csv,mlflow]"], tmp_path)
    assert list(chosen.logger) == ["tensorboard", "csv", "mlflow"]


def test_a_missing_extra_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        loggers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(SettingError, match=r"pip install 'covo\[wandb\]'"):
        loggers.wandb_logger(save_dir=".")


def test_wandb_goes_online_only_when_logged_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not loggers.wandb_logged_in()
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert loggers.wandb_logged_in()
