"""Every knob of every option of the run's groups (algorithm, optimizer, scheduler, data,
trainer, strategy, logger, callbacks, model) reaches the object the run builds.

Each run is composed as `python -m covo train <group>=<option>` composes it and built by
`covo.launch.train.build` (module, data module, trainer with its strategy, loggers and
callbacks). Each YAML key is then read back from the built object and compared with the value
written here by hand (`EXPECTED`, the oracle: not the YAML): a knob that does not reach its
object, or a YAML value that drifts, fails. A key is read under its own name, or under another
one mapped explicitly (`READ`); a key that is no constructor argument of a built object is
listed with the reason (`NOT_BUILT`); a YAML key that is neither fails the test, so a new knob
must be added here. The reward options: tests/test_reward_yaml_values.py.

Runs that can be built together are built together (`RUNS`: each option of these groups in one
of them), once per session: the whole file takes about 30 s on one core.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from conftest import CONF_DIR, compose_config, leaves, options
from lightning.pytorch.callbacks import ModelSummary
from omegaconf import OmegaConf, open_dict

from covo.callbacks.checkpoint import StepCheckpoint
from covo.callbacks.collapse_guard import CollapseGuard
from covo.callbacks.heldout_eval import HeldoutEval
from covo.callbacks.progress import StepProgressBar
from covo.data import arithmetic, reasoning_gym
from covo.infra.errors import SettingError
from covo.launch.train import build
from covo.models.loading import build_tiny

SEED = 5  # the run's `seed`: every `${seed}` resolves to it
OUT = "<output_dir>"  # the run's `paths.output_dir`, as the reader shows it
MODEL_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SMALL_DATA = ["data.train.num_problems=16", "data.val.num_problems=4"]
BASE = ["model=tiny", "reward=majority", f"seed={SEED}", "rollout.max_new_tokens=24"]

# Each option of the built groups is in one run; a trainer option only beside strategy=auto
# (ddp and fsdp set trainer.devices), trainer=gpu with accelerator=cpu (no GPU here).
RUNS = {
    "a": ["optimizer=adamw", "algorithm=grpo", "trainer=cpu", "strategy=auto", "logger=csv",
          "callbacks=default"],
    "b": ["optimizer=sgd", "algorithm=rloo", "trainer=gpu", "trainer.accelerator=cpu",
          "strategy=auto", "logger=tensorboard", "callbacks=heldout_eval"],
    "c": ["scheduler=cosine", "trainer.max_steps=100", "algorithm=reinforce_pp", "strategy=ddp",
          "logger=mlflow", "callbacks=none", "model=toy_reasoner"],
    "d": ["scheduler=constant", "trainer.max_steps=100", "strategy=fsdp", "logger=wandb",
          "model=toy_calibrated"],
    "e": ["logger=many"],
    "f": ["logger=none"],
}  # fmt: skip
GROUPS = ["optimizer", "scheduler", "algorithm", "trainer", "strategy", "logger", "callbacks"]
RUN_OF = {
    (group, override.split("=")[1]): run
    for run, overrides in RUNS.items()
    for override in overrides
    for group in GROUPS + ["model"]
    if override.startswith(f"{group}=")
}
RUN_OF["model", "tiny"] = "a"


def yaml_keys(cfg, group: str, option: str) -> set[str]:
    """The leaf keys `conf/<group>/<option>.yaml` sets (with its defaults list): under its
    group's node, or from the root for a `# @package _global_` option."""
    first = (CONF_DIR / group / f"{option}.yaml").read_text().splitlines()[0]
    if first == "# @package _global_":
        raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
        raw.pop("defaults", None)
        return set(leaves(raw))
    return set(leaves(OmegaConf.to_container(cfg[group], resolve=False)))


class Built:
    def __init__(self, cfg, module, datamodule, trainer, out: Path):
        self.cfg, self.module, self.datamodule, self.trainer = cfg, module, datamodule, trainer
        self.out = str(out)
        module.trainer = trainer
        self.optimizer = module.configure_optimizers()["optimizer"]
        self.scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]

    def callback(self, cls):
        (found,) = [c for c in self.trainer.callbacks if isinstance(c, cls)]
        return found

    def logger(self, name: str):
        (found,) = [x for x in self.trainer.loggers if type(x).__name__ == name]
        return found

    def path(self, value) -> str:
        return str(value).replace(self.out, OUT).replace(str(self.cfg.paths.log_dir), "<log_dir>")


@pytest.fixture(scope="session")
def built_runs() -> dict[str, Built]:
    return {}


@pytest.fixture
def built(built_runs, tmp_path_factory, monkeypatch):
    """The run `RUNS[name]`, built once. `trainer.precision: auto` decides by the CPU: the
    environment fixes it to bf16-mixed, so that `model.dtype: float32` shows apart from null."""
    monkeypatch.setenv("COVO_NATIVE_BF16", "1")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path_factory.getbasetemp() / "no_netrc"))
    monkeypatch.setenv("COVO_LOG_DIR", str(tmp_path_factory.getbasetemp() / "logs"))

    def get(name: str) -> Built:
        if name not in built_runs:
            out = tmp_path_factory.mktemp(f"run_{name}")
            cfg = compose_config("train", [*BASE, *SMALL_DATA, *RUNS[name]], out)
            before = torch.are_deterministic_algorithms_enabled()
            built_runs[name] = Built(cfg, *build(cfg), out)
            # the Trainer sets torch's global flag: read now, and put back for other tests
            built_runs[name].deterministic = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(before)
        return built_runs[name]

    return get


def lr_factors(b: Built, steps: list[int]) -> list[float]:
    """The learning rate at each optimizer step of `steps`, over the peak (`trainer.max_steps`
    steps in all)."""
    return [round(b.scheduler.lr_lambdas[0](t), 12) for t in steps]


def rule(b: Built, signal: str):
    (found,) = [r for r in b.callback(CollapseGuard).watch.detector.rules if r.signal == signal]
    return found


def class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


# key -> how the built run shows it (a key not here is read as the attribute of its own name)
READ = {
    "optimizer": {
        # the scheduler sets `lr` to its factor at step 0; the peak stays as `initial_lr`
        "lr": lambda b: b.optimizer.param_groups[0]["initial_lr"],
        "betas": lambda b: list(b.optimizer.param_groups[0]["betas"]),
        "weight_decay": lambda b: b.optimizer.param_groups[0]["weight_decay"],
        "momentum": lambda b: b.optimizer.param_groups[0]["momentum"],
        "_target_": lambda b: class_name(b.optimizer),
    },
    "scheduler": {
        # trainer.max_steps=100: the warm-up's steps, then the decay's middle and its floor
        "warmup_ratio": lambda b: lr_factors(b, [0, 1, 2, 3, 4]),
        "min_lr_ratio": lambda b: lr_factors(b, [51, 99]),
    },
    "algorithm": {
        "advantage._target_": lambda b: b.module.updater.algorithm.advantage.func.__name__,
        "advantage.scale_by_std": lambda b: b.module.updater.algorithm.advantage.keywords[
            "scale_by_std"
        ],
        "advantage.eps": lambda b: b.module.updater.algorithm.advantage.keywords["eps"],
        "advantage.gamma": lambda b: b.module.updater.algorithm.advantage.keywords["gamma"],
        # the frozen reference exists only with a KL term
        "kl_coef": lambda b: (b.module.updater.algorithm.kl_coef, b.module.reference is not None),
        **{
            key: (lambda b, key=key: OmegaConf.select(b.module.updater.algorithm, key))
            for key in [
                "kl_estimator",
                "kl_in_reward",
                "clip_eps",
                "loss_agg",
                "mask_truncated",
                "ppo_epochs",
                "micro_batch_size",
                "mini_batch_size",
                "filter.drop_all_zero",
                "filter.drop_all_equal",
            ]
        },
        "max_idle_rollouts": lambda b: b.module.algorithm.max_idle_rollouts,
    },
    "trainer": {
        "default_root_dir": lambda b: b.path(b.trainer.default_root_dir),
        "accelerator": lambda b: type(b.trainer.accelerator).__name__,
        "devices": lambda b: b.trainer.num_devices,
        "num_nodes": lambda b: b.trainer.num_nodes,
        "precision": lambda b: b.trainer.precision,
        "max_steps": lambda b: b.trainer.max_steps,
        "max_epochs": lambda b: b.trainer.max_epochs,
        "log_every_n_steps": lambda b: b.trainer.log_every_n_steps,
        "check_val_every_n_epoch": lambda b: b.trainer.check_val_every_n_epoch,
        "val_check_interval": lambda b: b.trainer.val_check_interval,
        "num_sanity_val_steps": lambda b: b.trainer.num_sanity_val_steps,
        "enable_model_summary": lambda b: any(
            isinstance(c, ModelSummary) for c in b.trainer.callbacks
        ),
        "enable_progress_bar": lambda b: isinstance(
            b.trainer.progress_bar_callback, StepProgressBar
        ),
        "deterministic": lambda b: b.deterministic,
        "use_distributed_sampler": lambda b: (
            b.trainer._accelerator_connector.use_distributed_sampler
        ),
    },
    "strategy": {
        "_target_": lambda b: type(b.trainer.strategy).__name__,
        "accelerator": lambda b: b.trainer.strategy.root_device.type,
        "strategy._target_": lambda b: type(b.trainer.strategy).__name__,
        "strategy.process_group_backend": lambda b: b.trainer.strategy._process_group_backend,
        # FSDP2 over devices x num_nodes processes
        "strategy.devices": lambda b: b.trainer.strategy._data_parallel_size,
        "strategy.num_nodes": lambda b: b.trainer.num_nodes,
        "strategy.accumulate_unsharded": lambda b: b.trainer.strategy.accumulate_unsharded,
        "trainer.devices": lambda b: b.trainer.num_devices,
    },
    "logger": {
        **{
            f"{name}.{key}": (lambda b, cls=cls, attr=attr: b.path(getattr(b.logger(cls), attr)))
            for name, cls in [("csv", "CSVLogger"), ("tensorboard", "TensorBoardLogger")]
            for key, attr in [("save_dir", "save_dir"), ("name", "name"), ("version", "version")]
        },
        "csv._target_": lambda b: type(b.logger("CSVLogger")).__name__,
        "tensorboard._target_": lambda b: type(b.logger("TensorBoardLogger")).__name__,
        "tensorboard.default_hp_metric": lambda b: b.logger("TensorBoardLogger")._default_hp_metric,
        "mlflow._target_": lambda b: type(b.logger("MLFlowLogger")).__name__,
        "mlflow.experiment_name": lambda b: b.logger("MLFlowLogger")._experiment_name,
        "mlflow.run_name": lambda b: b.logger("MLFlowLogger")._run_name,
        "mlflow.tracking_uri": lambda b: b.path(b.logger("MLFlowLogger")._tracking_uri),
        "mlflow.log_model": lambda b: b.logger("MLFlowLogger")._log_model,
        "wandb._target_": lambda b: type(b.logger("WandbLogger")).__name__,
        "wandb.save_dir": lambda b: b.path(b.logger("WandbLogger").save_dir),
        "wandb.project": lambda b: b.logger("WandbLogger")._project,
        "wandb.name": lambda b: b.logger("WandbLogger")._wandb_init["name"],
        # null: offline unless logged in (the test's environment holds no W&B login)
        "wandb.offline": lambda b: b.logger("WandbLogger")._offline,
        "wandb.log_model": lambda b: b.logger("WandbLogger")._log_model,
    },
    "callbacks": {
        "model_checkpoint._target_": lambda b: type(b.callback(StepCheckpoint)).__name__,
        "model_checkpoint.dirpath": lambda b: b.path(b.callback(StepCheckpoint).dirpath),
        **{
            f"model_checkpoint.{key}": (lambda b, key=key: getattr(b.callback(StepCheckpoint), key))
            for key in [
                "filename",
                "auto_insert_metric_name",
                "every_n_steps",
                "save_top_k",
                "save_last",
            ]
        },
        "collapse_guard._target_": lambda b: type(b.callback(CollapseGuard)).__name__,
        "collapse_guard.dirpath": lambda b: b.path(b.callback(CollapseGuard).dirpath),
        "collapse_guard.rules.top_answer_share.above": lambda b: (
            rule(b, "top_answer_share").kind,
            rule(b, "top_answer_share").value,
            rule(b, "top_answer_share").alone,
        ),
        "collapse_guard.rules.token_entropy.drop": lambda b: (
            rule(b, "token_entropy").kind,
            rule(b, "token_entropy").value,
            rule(b, "token_entropy").alone,
        ),
        "collapse_guard.rules.kl.above": lambda b: (rule(b, "kl").kind, rule(b, "kl").value),
        "collapse_guard.rules.kl.alone": lambda b: rule(b, "kl").alone,
        "collapse_guard.min_rules": lambda b: b.callback(CollapseGuard).watch.detector.min_rules,
        "collapse_guard.window_rollouts": lambda b: b.callback(CollapseGuard).watch.detector.window,
        "collapse_guard.baseline_rollouts": lambda b: (
            b.callback(CollapseGuard).watch.detector.baseline_steps
        ),
        "collapse_guard.stop_on_alarm": lambda b: b.callback(CollapseGuard).stop_on_alarm,
        "collapse_guard.save_pre_collapse": lambda b: (
            b.callback(CollapseGuard).watch.save_pre_collapse
        ),
        "collapse_guard.save_weights_only": lambda b: b.callback(CollapseGuard).save_weights_only,
        "heldout_eval._target_": lambda b: type(b.callback(HeldoutEval)).__name__,
        # the data option's validation items and prompt template (4 problems: SMALL_DATA)
        "heldout_eval.validation": lambda b: (
            b.callback(HeldoutEval).prompts["validation"]
            == [item["prompt"] for item in b.datamodule.val_items]
        ),
        "heldout_eval.test": lambda b: list(b.callback(HeldoutEval).prompts),
        "heldout_eval.prompt_template": lambda b: (
            b.callback(HeldoutEval).prompts["validation"][0]
            == b.cfg.data.prompt_template.format(problem=b.datamodule.val_items[0]["problem"])
        ),
        "heldout_eval.every_n_optimizer_steps": lambda b: b.callback(HeldoutEval).every,
        "heldout_eval.num_samples": lambda b: b.callback(HeldoutEval).sampling.num_samples,
        "heldout_eval.max_new_tokens": lambda b: b.callback(HeldoutEval).sampling.max_new_tokens,
        "heldout_eval.temperature": lambda b: b.callback(HeldoutEval).sampling.temperature,
        "heldout_eval.batch_size": lambda b: b.callback(HeldoutEval).sampling.batch_size,
        "heldout_eval.extractor": lambda b: b.callback(HeldoutEval).extract.__name__,
        "heldout_eval.seed": lambda b: b.callback(HeldoutEval).seed,
        "heldout_eval.path": lambda b: b.path(b.callback(HeldoutEval).path),
    },
}
READ["scheduler"]["_target_"] = lambda b: b.scheduler.lr_lambdas[0].__qualname__.split(".")[0]
READ["trainer"]["_target_"] = lambda b: class_name(b.trainer)

COSINE_PAST_WARMUP = 0.5 * (1 + math.cos(math.pi / 96))  # step 4 of 100: 1 of 96 decay steps
CHECKPOINTS = {
    "model_checkpoint._target_": "StepCheckpoint",
    "model_checkpoint.dirpath": f"{OUT}/checkpoints",
    "model_checkpoint.filename": "step_{step:06d}",
    "model_checkpoint.auto_insert_metric_name": False,
    "model_checkpoint.every_n_steps": 10,
    "model_checkpoint.save_top_k": -1,
    "model_checkpoint.save_last": True,
    "collapse_guard._target_": "CollapseGuard",
    "collapse_guard.dirpath": f"{OUT}/checkpoints",
    "collapse_guard.rules.top_answer_share.above": ("above", 0.95, False),
    "collapse_guard.rules.token_entropy.drop": ("drop", 0.5, False),
    "collapse_guard.rules.kl.above": ("above", 0.05),
    "collapse_guard.rules.kl.alone": True,
    "collapse_guard.min_rules": 2,
    "collapse_guard.window_rollouts": 3,
    "collapse_guard.baseline_rollouts": 3,
    "collapse_guard.stop_on_alarm": False,
    "collapse_guard.save_pre_collapse": True,
    "collapse_guard.save_weights_only": True,
}
TENSORBOARD = {
    "tensorboard._target_": "TensorBoardLogger",
    "tensorboard.save_dir": OUT,
    "tensorboard.name": "tensorboard",
    "tensorboard.version": "",
    "tensorboard.default_hp_metric": False,
}
CSV = {"csv._target_": "CSVLogger", "csv.save_dir": OUT, "csv.name": "csv", "csv.version": ""}
WANDB = {
    "wandb._target_": "WandbLogger",
    "wandb.save_dir": OUT,
    "wandb.project": "covo",
    "wandb.name": "train",  # task_name
    "wandb.offline": True,
    "wandb.log_model": False,
}
ALGORITHM = {
    "kl_coef": (1.0e-4, True),
    "kl_estimator": "k1",
    "kl_in_reward": True,
    "clip_eps": 0.2,
    "loss_agg": "token_mean",
    "mask_truncated": False,
    "ppo_epochs": 1,
    "micro_batch_size": 4,
    "mini_batch_size": None,
    "filter.drop_all_zero": True,
    "filter.drop_all_equal": True,
    "max_idle_rollouts": 20,
}
TRAINER = {
    "_target_": "lightning.pytorch.trainer.trainer.Trainer",
    "default_root_dir": OUT,
    "accelerator": "CPUAccelerator",
    "devices": 1,
    "num_nodes": 1,
    "precision": "bf16-mixed",  # auto: model=tiny sets no dtype, and the CPU has native bf16
    "max_steps": 12,
    "max_epochs": -1,
    "log_every_n_steps": 1,
    "check_val_every_n_epoch": None,
    "val_check_interval": 6,  # val_every_n_rollouts
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "enable_progress_bar": True,
    "deterministic": False,
    "use_distributed_sampler": False,
}

# the hand-written values: what each option's YAML means, as the built run must show it
EXPECTED = {
    "optimizer": {
        "adamw": {
            "_target_": "torch.optim.adamw.AdamW",
            "lr": 2.0e-6,
            "betas": [0.9, 0.95],
            "weight_decay": 0.0,
        },
        "sgd": {"_target_": "torch.optim.sgd.SGD", "lr": 1.0e-4, "momentum": 0.0},
    },
    "scheduler": {
        "cosine": {  # warm-up ceil(0.03 * 100) = 3 steps: (t + 1) / 4
            "_target_": "cosine_with_warmup",
            "warmup_ratio": [0.25, 0.5, 0.75, 1.0, round(COSINE_PAST_WARMUP, 12)],
            "min_lr_ratio": [0.5, 0.0],  # half-way through the decay; the last step
        },
        "constant": {"_target_": "constant_with_warmup", "warmup_ratio": [1.0] * 5},
    },
    "algorithm": {
        "grpo": {
            **ALGORITHM,
            "advantage._target_": "grpo",
            "advantage.scale_by_std": True,
            "advantage.eps": 1.0e-6,
            "kl_coef": (0.04, True),
            "kl_estimator": "k3",
            "kl_in_reward": False,
            "loss_agg": "seq_mean_token_mean",
        },
        "rloo": {**ALGORITHM, "advantage._target_": "rloo"},
        "reinforce_pp": {
            **ALGORITHM,
            "advantage._target_": "reinforce_pp",
            "advantage.gamma": 1.0,
            "filter.drop_all_equal": False,
        },
    },
    "trainer": {
        "cpu": TRAINER,
        "gpu": {k: v for k, v in TRAINER.items() if k != "accelerator"},
    },
    "strategy": {
        "auto": {"_target_": "SingleDeviceStrategy", "accelerator": "cpu"},
        "ddp": {
            "strategy._target_": "DDPStrategy",
            "strategy.process_group_backend": None,
            "trainer.devices": 2,
        },
        "fsdp": {
            "strategy._target_": "FullyShardedStrategy",
            "strategy.devices": 2,
            "strategy.num_nodes": 1,
            "strategy.accumulate_unsharded": False,
            "trainer.devices": 2,
        },
    },
    "logger": {
        "csv": CSV,
        "tensorboard": TENSORBOARD,
        "mlflow": {
            "mlflow._target_": "MLFlowLogger",
            "mlflow.experiment_name": "covo",
            "mlflow.run_name": "train",  # task_name
            "mlflow.tracking_uri": "file:<log_dir>/mlruns",
            "mlflow.log_model": False,
        },
        "wandb": WANDB,
        "many": {**TENSORBOARD, **CSV, **WANDB},
        "none": {},
    },
    "callbacks": {
        "default": CHECKPOINTS,
        "heldout_eval": {
            **CHECKPOINTS,
            "heldout_eval._target_": "HeldoutEval",
            "heldout_eval.validation": True,
            "heldout_eval.test": ["validation"],  # data=arithmetic has no test split
            "heldout_eval.prompt_template": True,
            "heldout_eval.every_n_optimizer_steps": 5,
            "heldout_eval.num_samples": 8,
            "heldout_eval.max_new_tokens": 24,  # rollout.max_new_tokens of these runs
            "heldout_eval.temperature": 1.0,
            "heldout_eval.batch_size": 8,
            "heldout_eval.extractor": "extract_boxed_or_last_number",
            "heldout_eval.seed": SEED,
            "heldout_eval.path": f"{OUT}/heldout.jsonl",
        },
        "none": {},
    },
}
# the loggers and callbacks each option adds to the trainer (besides the run's own: the
# metrics.jsonl writer; the seed per rank and the progress bar)
LOGGERS = {
    "csv": ["CSVLogger"],
    "tensorboard": ["TensorBoardLogger"],
    "mlflow": ["MLFlowLogger"],
    "wandb": ["WandbLogger"],
    "many": ["TensorBoardLogger", "CSVLogger", "WandbLogger"],
    "none": [],
}
CALLBACKS = {
    "default": ["CollapseGuard", "StepCheckpoint"],
    "heldout_eval": ["CollapseGuard", "HeldoutEval", "StepCheckpoint"],
    "none": [],
}

# keys no built object takes as a constructor argument, with the reason
NOT_BUILT = {
    "optimizer": {"_partial_": "Hydra's: the module completes the call with the parameters"},
    "scheduler": {"_partial_": "Hydra's: the module completes the call with the optimizer"},
    "algorithm": {"advantage._partial_": "Hydra's: the update completes the call"},
    "trainer": {},
    "strategy": {},
    "logger": {},
    "callbacks": {},
}
NOT_BUILT_OPTION = {
    ("trainer", "gpu"): {"accelerator": "gpu: needs a GPU (built here with accelerator=cpu)"},
}


def unaccounted(keys: set[str], expected: dict, listed: dict) -> list[str]:
    """YAML keys neither checked nor listed (a key is covered by itself or a dotted prefix)."""
    covered = set(expected) | set(listed)
    return sorted(
        key for key in keys if not any(key == c or key.startswith(f"{c}.") for c in covered)
    )


CASES = [(g, o) for g in GROUPS for o in options(g)]


def test_every_option_is_built_and_checked():
    assert sorted(CASES) == sorted((g, o) for g in GROUPS for o in EXPECTED[g])
    assert all(case in RUN_OF for case in CASES)
    assert sorted(EXPECTED_MODEL) == options("model")
    assert sorted(EXPECTED_DATA) == options("data")


@pytest.mark.parametrize("group,option", CASES, ids=lambda x: str(x))
def test_knobs_reach_the_built_run(group, option, built):
    b = built(RUN_OF[group, option])
    expected = EXPECTED[group][option]
    listed = {**NOT_BUILT[group], **NOT_BUILT_OPTION.get((group, option), {})}
    keys = yaml_keys(b.cfg, group, option)
    assert not unaccounted(keys, expected, listed), f"{group}={option}: keys to check or list"
    assert set(expected) <= keys
    got = {key: READ[group][key](b) for key in expected}
    assert got == expected
    if group == "logger":
        names = [type(x).__name__ for x in b.trainer.loggers]
        assert names == [*LOGGERS[option], "JsonlLogger"]
    if group == "callbacks":
        names = {type(c).__name__ for c in b.trainer.callbacks}
        assert names - {"SeedPerRank", "StepProgressBar"} == set(CALLBACKS[option])
        assert (b.trainer.checkpoint_callback is None) == (option == "none")


# --- model: the options built above (tiny, toy_reasoner, toy_calibrated) read from the run's
# module; the options that need downloaded or converted weights (hf, smollm2_135m, qwen_*)
# through the same loader (`load_hf`, which `load_packaged` calls) on a saved tiny model


def lora_config(model):
    return model.peft_config["default"]


MODEL_READ = {
    "_target_": lambda m: type(m.model).__name__,
    "hidden_size": lambda m: m.model.config.hidden_size,
    "num_layers": lambda m: m.model.config.num_hidden_layers,
    "num_heads": lambda m: m.model.config.num_attention_heads,
    # the weights are those of the run's seed
    "seed": lambda m: torch.equal(
        m.model.get_input_embeddings().weight,
        build_tiny(seed=SEED).model.get_input_embeddings().weight,
    ),
    "lab": lambda m: Path(m.model.name_or_path).name,
    "chat_template": lambda m: m.chat_template,
    "attn_implementation": lambda m: m.model.config._attn_implementation,
    # the compute dtype: trainer.precision's (auto follows model.dtype when set)
    "dtype": lambda m: m.precision,
    "master_dtype": lambda m: {MODEL_DTYPE[p.dtype] for p in m.model.parameters()},
    "gradient_checkpointing": lambda m: m.model.is_activation_checkpointing,
    "hold_graphs": lambda m: m.hold_graphs,
    # r 0: no adapters; the others read on the same option with lora.r=8 (`m.lora`)
    "lora.r": lambda m: lora_config(m.model).r if hasattr(m.model, "peft_config") else 0,
    "lora.alpha": lambda m: lora_config(m.lora).lora_alpha,
    "lora.dropout": lambda m: lora_config(m.lora).lora_dropout,
    "lora.target_modules": lambda m: sorted(lora_config(m.lora).target_modules),
}
SHARED_MODEL = {
    "chat_template": True,
    "attn_implementation": "sdpa",
    "master_dtype": {"float32"},
    "gradient_checkpointing": False,
    "lora.r": 0,
    "lora.alpha": 16,
    "lora.dropout": 0.0,
    "lora.target_modules": ["q_proj", "v_proj"],
}
TOY_MODEL = {
    **SHARED_MODEL,
    "_target_": "LlamaForCausalLM",
    "dtype": "32-true",
    "hold_graphs": True,
}
EXPECTED_MODEL = {
    "tiny": {
        **SHARED_MODEL,
        "_target_": "LlamaForCausalLM",
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "seed": True,
        "dtype": "bf16-mixed",  # null: trainer.precision auto, a CPU with native bf16
        "hold_graphs": True,
    },
    "toy_reasoner": {**TOY_MODEL, "lab": "toy_reasoner"},
    "toy_calibrated": {**TOY_MODEL, "lab": "toy_calibrated"},
    "hf": {**SHARED_MODEL, "hold_graphs": False},
    "smollm2_135m": {**SHARED_MODEL, "hold_graphs": True},
    "qwen_coder_05b": {**SHARED_MODEL, "hold_graphs": False},
    "qwen_coder_15b": {**SHARED_MODEL, "hold_graphs": False},
}
LOADED_THROUGH_LOAD_HF = {
    "_target_": "a loader of weights not built here; its options reach load_hf, checked here",
    "dtype": "read by the launcher (trainer.precision); checked on the options built above",
}
NOT_BUILT_MODEL = {
    "tiny": {},
    "toy_reasoner": {"weights": "null: the packaged lab's folder, read back as `lab`"},
    "toy_calibrated": {"weights": "null: the packaged lab's folder, read back as `lab`"},
    "hf": {**LOADED_THROUGH_LOAD_HF, "name_or_path": "required (???): the folder given"},
    **{
        option: {
            **LOADED_THROUGH_LOAD_HF,
            "cache_dir": "where the converted GGUF folder is kept: needs the weights",
        }
        for option in ("smollm2_135m", "qwen_coder_05b", "qwen_coder_15b")
    },
}


class Model:
    """What the run holds of the model: its policy, chat flag, hold_graphs, the trainer's
    precision; `lora` the same option's model built with lora.r=8."""

    def __init__(self, model, chat_template, hold_graphs, precision, lora):
        self.model, self.chat_template, self.hold_graphs = model, chat_template, hold_graphs
        self.precision, self.lora = precision, lora


def with_lora(node):
    node = node.copy()
    with open_dict(node):
        node.lora.r = 8
    return hydra.utils.instantiate(node).model


@pytest.mark.parametrize("option", options("model"))
def test_model_knobs_reach_the_policy(option, built, saved_tiny, tmp_path):
    if (option_run := RUN_OF.get(("model", option))) is not None:
        b = built(option_run)
        cfg, module = b.cfg, b.module
        m = Model(
            module.policy,
            module.chat_template,
            module.updater.hold_graphs,
            b.trainer.precision,
            with_lora(cfg.model),
        )
    else:
        required = ["model.name_or_path=x"] if option == "hf" else []
        cfg = compose_config("train", [f"model={option}", *required], tmp_path)
        node = cfg.model.copy()
        with open_dict(node):
            node._target_ = "covo.models.loading.load_hf"
            node.name_or_path = str(saved_tiny)
            node.pop("cache_dir", None)
        loaded = hydra.utils.instantiate(node)
        m = Model(loaded.model, loaded.chat_template, loaded.hold_graphs, None, with_lora(node))
    expected = EXPECTED_MODEL[option]
    keys = set(leaves(OmegaConf.to_container(cfg.model, resolve=False)))
    assert not unaccounted(keys, expected, NOT_BUILT_MODEL[option]), f"model={option}"
    got = {key: MODEL_READ[key](m) for key in expected}
    assert got == expected


# --- data: the data module as the run builds it (`hydra.utils.instantiate(cfg.data)`), and the
# held-out evaluation's test split (the only reader of `data.test`)

MATH_TEMPLATE = (
    "Question: {problem}\nPlease reason step by step, and put your final answer within "
    "\\boxed{{}}\n"
)
ARITHMETIC = dict(min_operands=2, max_operands=3, max_value=20, operators=["+", "-", "*"])
TOY = dict(
    min_operands=3,
    max_operands=4,
    max_value=9,
    operators=["+", "-"],
    parts={"pretrain": 8, "train": 1, "val": 1},
    distinct=True,
)
CALIBRATED = {**TOY, "max_operands": 5}
# each split's generator call, by hand: the items must be these (seed, split, parts, distinct
# and skip reach the generator only through the items)
SPLITS = {
    "arithmetic": {
        "train": dict(num_problems=2000, seed=SEED, parts={"train": 9, "val": 1}, **ARITHMETIC),
        "val": dict(
            num_problems=16, seed=SEED, split="val", parts={"train": 9, "val": 1}, **ARITHMETIC
        ),
    },
    "toy_arithmetic": {
        "train": dict(num_problems=2000, seed=SEED, split="train", **TOY),
        "val": dict(num_problems=64, seed=0, split="val", **TOY),
        "test": dict(num_problems=64, seed=0, split="val", skip=1024, **TOY),
    },
    "toy_calibrated": {
        "train": dict(num_problems=2000, seed=SEED, split="train", **CALIBRATED),
        "val": dict(num_problems=128, seed=0, split="val", **CALIBRATED),
        "test": dict(num_problems=128, seed=0, split="val", skip=1024, **CALIBRATED),
    },
}
RG_TASKS = ["basic_arithmetic", "chain_sum", "simple_equations", "leg_counting"]
RG_CONFIG = {
    "basic_arithmetic": {
        "max_terms": 3,
        "max_digits": 2,
        "operators": ["+", "-", "*"],
        "allow_parentheses": False,
    },
    "chain_sum": {"max_terms": 4, "max_digits": 2},
    "simple_equations": {"max_terms": 3, "max_value": 20},
    "leg_counting": {"max_animals": 3, "max_instances": 5},
}
DATA_COMMON = {
    "_target_": "PromptDataModule",
    "allow_benchmark_overlap": False,
    "benchmark_dir": "<benchmark_dir>",
    "seed": SEED,
}
EXPECTED_DATA = {
    "arithmetic": {
        **DATA_COMMON,
        "name": "arithmetic",
        "train": True,
        "train.num_problems": 2000,
        "train.min_operands": 2,
        "train.max_operands": 3,
        "train.max_value": 20,
        "train.operators": ["*", "+", "-"],
        "val": True,
        "val.num_problems": 16,
        "prompt_template": MATH_TEMPLATE,
        "batch_size": 2,
        "val_batch_size": 16,
    },
    "toy_arithmetic": {
        **DATA_COMMON,
        "name": "toy_arithmetic",
        "train": True,
        "train.num_problems": 2000,
        "train.min_operands": 3,
        "train.max_operands": 4,
        "train.max_value": 9,
        "train.operators": ["+", "-"],
        "train.distinct": True,
        "val": True,
        "val.num_problems": 64,
        "test": True,
        "test.num_problems": 64,
        "prompt_template": "Question: {problem}\n",
        "batch_size": 4,
        "val_batch_size": 64,
    },
    "toy_calibrated": {
        **DATA_COMMON,
        "name": "toy_calibrated",
        "train": True,
        "train.num_problems": 2000,
        "train.min_operands": 3,
        "train.max_operands": 5,
        "train.max_value": 9,
        "train.operators": ["+", "-"],
        "train.distinct": True,
        "val": True,
        "val.num_problems": 128,
        "test": True,
        "test.num_problems": 128,
        "prompt_template": "Question: {problem}\n",
        "batch_size": 4,
        "val_batch_size": 64,
    },
    "jsonl": {
        **DATA_COMMON,
        "name": "jsonl",
        "train": True,  # the file's rows, under problem_key and answer_key, none left out
        "val": True,  # null: the file's last val_size rows are held out
        "val_size": 32,
        "prompt_template": MATH_TEMPLATE,
        "batch_size": 4,
        "val_batch_size": 16,
    },
    "reasoning_gym": {
        **DATA_COMMON,
        # the items are reasoning_gym.generate's with RG_TASKS and RG_CONFIG
        "tasks": True,
        "task_config": True,
        "size": 2000,
        "val_size": (16, True),  # none of the 16 (nor a 17th) is a training problem
        "prompt_template": MATH_TEMPLATE,
        "batch_size": 2,
        "val_batch_size": 16,
    },
}
EXPECTED_DATA["gsm8k"] = {**EXPECTED_DATA["jsonl"], "name": "gsm8k"}
EXPECTED_DATA["math500"] = {**EXPECTED_DATA["jsonl"], "name": "math500"}
NOT_BUILT_DATA = {
    "train._target_": "the generator: its items are checked (`train`)",
    "val._target_": "the generator: its items are checked (`val`)",
    "test._target_": "the generator: its items are checked (`test`)",
}
ROWS = [{"problem": f"What is {i} + 1?", "answer": str(i + 1), "text": "x"} for i in range(40)]
PACKAGED = Path(arithmetic.__file__).parent / "files"


def operands(problem: str) -> list[str]:
    return problem.removeprefix("Compute ").removesuffix(".").split()


def rows_of(option: str, path: Path) -> list[dict]:
    """The data file's rows, read here: the jsonl option's file, or the packaged set."""
    source = path if option == "jsonl" else PACKAGED / f"{option}.jsonl"
    return [json.loads(line) for line in source.read_text().splitlines() if line.strip()]


def read_data(option: str, cfg, dm, test: list[str] | None, path: Path) -> dict:
    """Each key of EXPECTED_DATA[option] as the data module (and the test split) shows it."""
    train, val = dm.train_items, dm.val_items
    problems = [item["problem"] for item in train]
    batch = next(iter(dm.train_dataloader()))
    out = {
        "_target_": type(dm).__name__,
        "name": dm.name,
        "seed": dm.seed,
        "allow_benchmark_overlap": dm.allow_benchmark_overlap,
        "benchmark_dir": str(dm.benchmark_dir).replace(
            str(cfg.paths.benchmark_dir), "<benchmark_dir>"
        ),
        "prompt_template": dm.prompt_template,
        # what a rollout step gets, and what the data module holds
        "batch_size": dm.batch_size if len(batch["prompt"]) == dm.batch_size else "differs",
        "val_batch_size": dm.val_batch_size
        if next(iter(dm.val_dataloader()))["prompt"]
        == [i["prompt"] for i in val[: dm.val_batch_size]]
        else "differs",
    }
    if option in SPLITS:
        splits = SPLITS[option]
        counts = [len(operands(p)[0::2]) for p in problems]
        values = [int(v) for p in problems for v in operands(p)[0::2]]
        out |= {
            "train": problems == [i["problem"] for i in arithmetic.generate(**splits["train"])],
            "train.num_problems": len(train),
            "train.min_operands": min(counts),
            "train.max_operands": max(counts),
            "train.max_value": max(values),
            "train.operators": sorted({op for p in problems for op in operands(p)[1::2]}),
            "train.distinct": len(set(problems)) == len(problems),
            "val": [i["problem"] for i in val]
            == [i["problem"] for i in arithmetic.generate(**splits["val"])],
            "val.num_problems": len(val),
        }
        if "test" in splits:
            template = cfg.data.prompt_template
            wanted = arithmetic.generate(**splits["test"])
            out |= {
                "test": test == [template.format(problem=i["problem"]) for i in wanted],
                "test.num_problems": len(test),
            }
    elif option == "reasoning_gym":
        items = reasoning_gym.generate(RG_TASKS, 2000, SEED, "train", RG_CONFIG)
        held = reasoning_gym.generate(RG_TASKS, 16, SEED, "val", RG_CONFIG)
        seen = {i["problem"] for i in items}
        reproduced = train == [dm.with_prompt(i) for i in items]
        out |= {
            "tasks": reproduced,
            "task_config": reproduced,
            "size": len(train),
            "val_size": (
                len(val),
                val == [dm.with_prompt(i) for i in held if i["problem"] not in seen],
            ),
        }
    else:
        rows = rows_of(option, path)
        items = [{"problem": r["problem"], "answer": str(r["answer"])} for r in rows]
        out |= {
            "train": [{k: i[k] for k in ("problem", "answer")} for i in train + val] == items,
            "val": [{k: i[k] for k in ("problem", "answer")} for i in val] == items[-len(val) :],
            "val_size": len(val),
        }
    return out


@pytest.mark.parametrize("option", options("data"))
def test_data_knobs_reach_the_data_module(option, tmp_path, monkeypatch):
    monkeypatch.setenv("COVO_BENCHMARK_DIR", str(tmp_path / "benchmarks"))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    overrides = [f"data={option}", f"seed={SEED}", "callbacks=heldout_eval"]
    if option == "jsonl":
        overrides.append(f"data.train.path={path}")
    cfg = compose_config("train", overrides, tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    test = None
    if OmegaConf.select(cfg, "data.test") is not None:
        test = hydra.utils.instantiate(cfg.callbacks.heldout_eval).prompts["test"]
    expected = EXPECTED_DATA[option]
    keys = set(leaves(OmegaConf.to_container(cfg.data, resolve=False)))
    assert not unaccounted(keys, expected, NOT_BUILT_DATA), f"data={option}"
    got = read_data(option, cfg, dm, test, path)
    assert {key: got[key] for key in expected} == expected


@pytest.mark.parametrize("key", ["devices", "num_nodes"])
def test_more_processes_than_strategy_auto_runs_are_refused(key, tmp_path):
    """strategy=auto is one process: Lightning's single-device strategy ignores
    trainer.devices and trainer.num_nodes, so a run asked for 2 would train on 1 silently."""
    cfg = compose_config("train", [*BASE, *SMALL_DATA, f"trainer.{key}=2"], tmp_path)
    with pytest.raises(SettingError, match=rf"^trainer\.{key}=2: expected 1 with strategy=auto"):
        build(cfg)
