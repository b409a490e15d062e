"""LoRA through peft: adapters train on frozen weights that the reference, the rollout replica
and the export share; checkpoints hold the adapters, and a resume continues exactly."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN, compose_config
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from covo.eval.harness import load_policy_checkpoint
from covo.launch.settings import check_train
from covo.launch.train import build, resolve_auto, train
from covo.models.loading import build_tiny
from covo.models.lora import MissingExtraError, add_adapters, base_of, is_lora, merged_state
from covo.rollout.replica import InferenceView

peft = pytest.importorskip("peft", reason="the `lora` extra")

R = 4
LORA = {"r": R, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
# the tiny model (hidden 64, MLP 128, 2 layers): r x (in + out) per adapted linear layer,
# q/k/v/o 64 -> 64 and gate/up 64 -> 128, down 128 -> 64
ADAPTER_PARAMS = 2 * (4 * R * (64 + 64) + 3 * R * (64 + 128))
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 31]])


def perturbed_lora(seed: int = 0):
    """The tiny model with adapters whose B is random (peft starts B at zero: a no-op)."""
    policy = build_tiny(seed=seed, lora=LORA).model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_only_the_adapters_train():
    policy = build_tiny(lora=LORA).model
    trained = [p for p in policy.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == ADAPTER_PARAMS == 8704
    assert is_lora(policy) and not is_lora(build_tiny().model)


def test_the_configured_default_adapts_query_and_value_only(tmp_path):
    lora = config(tmp_path, "model.lora.r=4").model.lora
    policy = build_tiny(lora={**lora, "r": R}).model
    adapted = {name.split(".")[-4] for name, p in policy.named_parameters() if p.requires_grad}
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert adapted == {"q_proj", "v_proj"}
    assert trained == 2 * 2 * R * (64 + 64) == 2048  # 2 layers x (q, v), each 64 -> 64


def test_target_modules_the_model_lacks_is_one_line_naming_the_key():
    with pytest.raises(ValueError) as err:
        build_tiny(lora={**LORA, "target_modules": ["c_attn"]})
    assert str(err.value).startswith("model.lora.target_modules=['c_attn']: Target modules")
    assert "\n" not in str(err.value)


def test_merged_state_is_peft_merge_and_unload():
    policy = perturbed_lora()
    merged = LlamaForCausalLM(base_of(policy).config)
    merged.load_state_dict(merged_state(policy, policy.state_dict()))
    oracle = copy.deepcopy(policy).merge_and_unload()
    assert merged.state_dict().keys() == oracle.state_dict().keys()
    for name, value in oracle.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=0, atol=1e-7)
    # the adapters moved the output, and the merged model computes what the adapted one does
    base = logits(build_tiny().model)
    adapted = logits(policy)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)


def test_the_replica_is_the_merged_model_in_its_dtype():
    policy = perturbed_lora()
    assert InferenceView()(policy) is base_of(policy)  # no replica: the adapted model
    replica = InferenceView(torch.bfloat16)(policy)
    assert type(replica) is LlamaForCausalLM
    assert {p.dtype for p in replica.parameters()} == {torch.bfloat16}
    err = (logits(replica).float() - logits(policy)).abs().max()
    assert err < 0.05, err  # bf16 rounding only


def test_missing_peft_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` then fails
    with pytest.raises(MissingExtraError, match=r"^LoRA needs peft: pip install -e '\.\[lora\]'"):
        add_adapters(build_tiny().model, r=2, alpha=4)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"^model\.lora\.r=8: LoRA needs peft: .*\[lora\]"):
        check_train(config(tmp_path, "model.lora.r=8"))


def config(tmp_path, *overrides):
    cfg = compose_config("train", [*TINY_RUN, *overrides], tmp_path)
    resolve_auto(cfg)
    return cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lora.r=-1"], "model.lora.r=-1: expected an integer >= 0 (0 = no adapters)"),
        (["model.lora.r=8", "model.lora.alpha=0"], "model.lora.alpha=0: expected a number > 0"),
        (["model.lora.dropout=1"], "model.lora.dropout=1: expected a number in [0, 1)"),
        (
            ["model.lora.target_modules=[]"],
            "model.lora.target_modules=[]: expected all-linear or a list of module names",
        ),
        (
            ["model.lora.r=8", "module.reference_dtype=bfloat16"],
            "module.reference_dtype=bfloat16: expected null with model.lora (the reference is the"
            " policy's own weights, adapters off)",
        ),
        (
            ["export_adapters=true"],
            "export_adapters=true: expected false without model.lora.r > 0",
        ),
    ],
)
def test_bad_lora_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        check_train(config(tmp_path, *overrides))
    assert str(err.value).startswith(message)


def test_lora_null_is_off(tmp_path):
    cfg = config(tmp_path, "model.lora=null", "callbacks=none", "logger=none")
    module, _, _ = build(cfg)
    assert not is_lora(module.policy)


def tiny_lora(tmp_path: Path, *overrides: str):
    return config(
        tmp_path,
        f"model.lora.r={R}",
        "model.lora.alpha=8",
        "model.lora.target_modules=all-linear",  # the MLP too (the default adapts q and v)
        "reward=self_certainty",  # every response its own reward: no group is filtered away
        "optimizer.lr=1e-2",  # adapters move well past the tolerances below
        "trainer.precision=32-true",
        "threads=1",
        "val_every_n_rollouts=100",
        "logger=none",
        "callbacks.collapse_guard=null",
        "callbacks.model_checkpoint.every_n_steps=1",
        *overrides,
    )


def test_reference_is_the_policy_with_adapters_off_not_a_copy(tmp_path):
    module, _, _ = build(
        config(
            tmp_path,
            f"model.lora.r={R}",
            "model.lora.target_modules=all-linear",
            "callbacks=none",
            "logger=none",
        )
    )
    policy = module.policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    # no second copy: every tensor the reference reaches is one of the policy's
    policy_storages = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    assert {p.untyped_storage().data_ptr() for p in module.reference.parameters()} == (
        policy_storages
    )
    held = sum(p.numel() for p in module.parameters())
    assert held == sum(p.numel() for p in build_tiny().model.parameters()) + ADAPTER_PARAMS
    # it computes the base model, while the policy computes the adapted one
    base = logits(build_tiny().model)
    torch.testing.assert_close(module.reference(input_ids=IDS).logits, base, rtol=0, atol=0)
    assert (logits(policy) - base).abs().max() > 1e-3


def adapters(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}


def kl_by_step(run: Path) -> list[float]:
    (events,) = {p.parent for p in run.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [e.value for e in accumulator.Scalars("train/kl")]


def test_lora_run_checkpoints_adapters_and_exports_the_merged_model(tmp_path):
    out = train(tiny_lora(tmp_path, "logger=tensorboard"))
    # KL from the reference (the base): 0 while the adapters are zero (peft's start), then not
    first, second = kl_by_step(Path(out["output_dir"]))
    assert first == 0.0 and second != 0.0
    ckpt = Path(out["output_dir"]) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    state = saved["state_dict"]
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    assert sum(v.numel() for v in state.values()) == ADAPTER_PARAMS
    (optimizer,) = saved["optimizer_states"]
    assert len(optimizer["state"]) == len(state)  # AdamW moments of the adapters only
    assert ckpt.stat().st_size < 3 * 4 * ADAPTER_PARAMS + 200_000  # weights + 2 moments, fp32

    # the merged export computes what the trained adapters on the frozen base compute
    policy = build_tiny(lora=LORA).model
    assert load_policy_checkpoint(policy, str(ckpt)) == 2
    with pytest.raises(ValueError, match=r"holds LoRA adapters: set model\.lora as in its"):
        load_policy_checkpoint(build_tiny().model, str(ckpt))
    exported = AutoModelForCausalLM.from_pretrained(out["export_dir"])
    assert type(exported) is LlamaForCausalLM
    assert (logits(policy) - logits(build_tiny().model)).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(logits(exported), logits(policy), rtol=1e-5, atol=1e-5)


def test_export_adapters_writes_peft_folder(tmp_path):
    out = train(tiny_lora(tmp_path, "export_adapters=true", "trainer.max_steps=1"))
    folder = Path(out["export_dir"])
    assert (folder / "adapter_config.json").exists()
    assert len(load_file(folder / "adapter_model.safetensors")) == 28  # A and B of 14 layers
    loaded = peft.PeftModel.from_pretrained(build_tiny().model, folder)
    trained = build_tiny(lora=LORA).model
    ckpt = Path(out["output_dir"]) / "checkpoints" / "last.ckpt"
    load_policy_checkpoint(trained, str(ckpt))
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=1e-6)


def test_resume_continues_the_adapters_exactly(tmp_path):
    straight = train(tiny_lora(tmp_path / "straight", "export_dir=null"))
    first = train(tiny_lora(tmp_path / "first", "export_dir=null", "trainer.max_steps=1"))
    last = Path(first["output_dir"]) / "checkpoints" / "last.ckpt"
    resumed = train(tiny_lora(tmp_path / "resumed", "export_dir=null", f"ckpt_path={last}"))
    want = adapters(Path(straight["output_dir"]) / "checkpoints" / "last.ckpt")
    got = adapters(Path(resumed["output_dir"]) / "checkpoints" / "last.ckpt")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    # the second step moved them: equality is not the first run's checkpoint
    mid = adapters(last)
    assert max((mid[k] - got[k]).abs().max() for k in got) > 1e-4


TWO_PROCESS_RUN = [
    *TINY_RUN,
    f"model.lora.r={R}",
    "model.lora.alpha=8",
    "model.lora.target_modules=all-linear",
    "reward=self_certainty",
    "optimizer.lr=1e-2",
    "trainer.precision=32-true",
    "threads=1",
    "val_every_n_rollouts=100",
    "callbacks.collapse_guard=null",
    "callbacks.model_checkpoint.every_n_steps=1",
]


def run_train(log_dir: Path, *overrides: str) -> Path:
    """`train.py` on two processes; returns the run's directory."""
    proc = subprocess.run(
        [sys.executable, "train.py", *TWO_PROCESS_RUN, f"paths.log_dir={log_dir}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr + proc.stdout  # the second process joined
    (run,) = (log_dir / "train" / "runs").iterdir()
    return run


def test_ddp_trains_the_adapters_on_two_processes(tmp_path):
    run = run_train(tmp_path, "strategy=ddp")
    first, second = kl_by_step(run)
    assert first == 0.0 and second != 0.0
    policy = build_tiny(lora=LORA).model
    assert load_policy_checkpoint(policy, str(run / "checkpoints" / "last.ckpt")) == 2
    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model")
    assert (logits(policy) - logits(build_tiny().model)).abs().max() > 1e-3
    torch.testing.assert_close(logits(exported), logits(policy), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_trains_and_resumes_the_adapters(tmp_path):
    """FSDP2 writes a distributed checkpoint folder: a run resumed from its first step ends
    where the uninterrupted run does."""
    straight = run_train(tmp_path / "straight", "strategy=fsdp")
    first, second = kl_by_step(straight)
    assert first == 0.0 and second != 0.0
    one = run_train(tmp_path / "one", "strategy=fsdp", "trainer.max_steps=1")
    last = one / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    saved = FileSystemReader(last).read_metadata().state_dict_metadata
    weights = {k: v.size for k, v in saved.items() if k.startswith("state_dict.")}
    assert all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert sum(math.prod(size) for size in weights.values()) == ADAPTER_PARAMS
    resumed = run_train(tmp_path / "resumed", "strategy=fsdp", f"ckpt_path={last}")
    want = load_file(straight / "hf_model" / "model.safetensors")
    got = load_file(resumed / "hf_model" / "model.safetensors")
    after_one = load_file(one / "hf_model" / "model.safetensors")
    base = build_tiny().model.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert (after_one[name] - base[name]).abs().max() > 1e-4  # the first step trained
    assert (want[name] - after_one[name]).abs().max() > 1e-4  # and so did the second
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
