"""LoRA through peft (the `lora` extra): the policy trains low-rank adapters on frozen weights.

One copy of the base weights serves the policy (adapters on), the KL reference (adapters off),
the rollout replica and the export (adapters merged into the weights they adapt).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from covo.infra.checks import Rule, above, apply_rules, at_least, between, names
from covo.infra.errors import UserError

MISSING = "LoRA needs peft: pip install -e '.[lora]' (or `bash scripts/setup.sh lora`)"


class MissingExtraError(UserError, RuntimeError):
    """An optional dependency is not installed; the message names the extra that brings it."""


LORA_RULES: list[Rule] = [
    ("r", at_least(0, integer_only=True), "an integer >= 0 (0 = no adapters)"),
    ("alpha", above(0.0), "a number > 0"),
    ("dropout", between(0.0, 1.0, high_open=True), "a number in [0, 1)"),
    (
        "target_modules",
        lambda v: v == "all-linear" or names(v),
        "all-linear or a list of module names",
    ),
]


def check_lora_settings(lora, prefix: str = "model.lora.") -> None:
    """`model.lora`'s knobs (`add_adapters`' arguments); null turns adapters off."""
    if lora is not None:
        apply_rules(lora, LORA_RULES, prefix)


def wants_lora(lora) -> bool:
    """`model.lora` turns adapters on when it is set and its rank `r` is above 0."""
    return lora is not None and lora["r"] > 0


def add_adapters(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
) -> nn.Module:
    """`model` wrapped by peft with rank-`r` adapters (scaled by alpha / r) on `target_modules`
    (module names, or `all-linear`: every linear layer but the output head); only the adapters
    require gradients."""
    try:
        import peft
    except ImportError:
        raise MissingExtraError(MISSING) from None
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # peft asks transformers about checkpointing the old way
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as err:  # e.g. no module of that name (GPT-2 has c_attn, not q_proj)
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"model.lora.target_modules={targets}: {first}") from None


def is_lora(model) -> bool:
    peft = sys.modules.get("peft")  # a model can only be peft's once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


def base_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper, its adapters injected and active (a plain
    causal LM for `generate` and the scorer); any other model as it is."""
    return model.get_base_model() if is_lora(model) else model


class AdaptersDisabled:
    """The policy with its adapters switched off: the frozen base model, as the KL reference,
    without a second copy of its weights."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def parameters(self):
        return self.policy.parameters()

    def to(self, *args, **kwargs) -> AdaptersDisabled:
        return self  # it lives where the policy does


def adapted_layers(policy: nn.Module) -> dict[str, float]:
    """Name of each layer that carries an adapter -> its scaling (alpha / r)."""
    from peft.tuners.lora import LoraLayer

    name = policy.active_adapter
    return {
        key: module.scaling[name]
        for key, module in policy.named_modules()
        if isinstance(module, LoraLayer)
    }


def merged_state(policy: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`, the policy's whole state dict, as its base model's state dict with each adapted
    weight merged: W + scaling * B @ A (what peft's `merge_and_unload` computes), in W's dtype.
    Any other model's state is returned as it is."""
    return dict(merged_entries(policy, state)) if is_lora(policy) else state


def merged_entries(policy: nn.Module, state: dict[str, torch.Tensor], whole=lambda t: t):
    """`merged_state` one entry at a time, each made only when it is reached: `whole(tensor)`
    makes a (sharded) entry of `state` whole, so no more than one adapted weight, its adapters
    and its merge are whole at once."""
    if not is_lora(policy):
        yield from ((key, whole(value)) for key, value in state.items())
        return
    adapter, scalings = policy.active_adapter, adapted_layers(policy)
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.replace(".base_layer.", ".").removeprefix("base_model.model.")
        layer = key.removesuffix(".base_layer.weight")
        if layer not in scalings:
            yield name, whole(value)
            continue
        a = whole(state[f"{layer}.lora_A.{adapter}.weight"]).float()
        b = whole(state[f"{layer}.lora_B.{adapter}.weight"]).float()
        weight = whole(value)
        yield name, (weight.float() + scalings[layer] * (b @ a)).to(weight.dtype)
        del a, b, weight


def adapter_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`module`'s state dict `state` cut, in place, to the entries that train: under LoRA the
    adapters only (the frozen weights are the loaded model's: checkpoints need not hold them)."""
    trainable = {
        name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad
    }
    for key in [key for key in state if key not in trainable]:
        del state[key]
    return state


def reference_of(policy: nn.Module, dtype: torch.dtype | None = None):
    """The frozen KL reference: under LoRA the policy with its adapters off (`dtype` must then
    be None: the weights are the policy's own); otherwise a copy of the policy, in `dtype`."""
    if is_lora(policy):
        return AdaptersDisabled(policy)
    from covo.models.loading import copy_weights, empty_copy  # loading builds LoRA models

    # allocated in `dtype` and filled weight by weight: never a second fp32 copy on the host
    reference = empty_copy(policy, dtype, next(policy.parameters()).device)
    copy_weights(reference, policy.state_dict().items())
    return reference
