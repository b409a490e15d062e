"""CoVo statistics: distance ratios, consistency, volatility, cluster aggregation, curiosity.

Pure functions over tensors and floats (docs/covo.md, Consistency and volatility of one
trajectory; Aggregation per answer cluster; Curiosity bonus).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor


def distance_ratios(D: Tensor, own: int) -> Tensor:
    """r_i = D[i, own] / min_{k != own} D[i, k] for D of shape [T, K >= 2]; returns [T].

    Equal distances give exactly 1 (also when both are 0); r < 1 means the state is closest to
    its own answer.

    >>> distance_ratios(torch.tensor([[1.0, 2.0, 4.0], [3.0, 2.0, 6.0], [0.0, 0.0, 1.0]]), 0)
    tensor([0.5000, 1.5000, 1.0000])
    """
    others = torch.cat([D[:, :own], D[:, own + 1 :]], dim=1)
    nearest = others.min(dim=1).values
    own_distance = D[:, own]
    return torch.where(
        own_distance == nearest, torch.ones_like(own_distance), own_distance / nearest
    )


def consistency(ratios: Tensor, ties_consistent: bool = False) -> float:
    """Share of states closest to the own answer: r < 1 (r <= 1 when ties count).

    >>> consistency(torch.tensor([0.5, 1.0, 2.0])), consistency(torch.tensor([0.5, 1.0]), True)
    (0.3333333333333333, 1.0)
    """
    consistent = ratios <= 1 if ties_consistent else ratios < 1
    return consistent.sum().item() / consistent.numel()


VOLATILITY_OFFSETS = {"released": 1, "paper": 0}


def volatility(ratios: Tensor, index: str = "released") -> float:
    """(m + 1) / T (released) or m / T (paper), m = last index with r > 1; 0 when none.

    >>> r = torch.tensor([2.0, 0.5, 3.0, 0.5])  # m = 2, T = 4
    >>> volatility(r), volatility(r, "paper")
    (0.75, 0.5)
    """
    offset = VOLATILITY_OFFSETS[index]
    deviating = torch.nonzero(ratios > 1).flatten()
    if deviating.numel() == 0:
        return 0.0
    return (deviating[-1].item() + offset) / ratios.numel()


def aggregate_linear(cons: Sequence[float], vols: Sequence[float]) -> float:
    """RiL = mean(Con) - mean(Vol) over a cluster's members."""
    return math.fsum(cons) / len(cons) - math.fsum(vols) / len(vols)


def aggregate_vector(cons: Sequence[float], vols: Sequence[float]) -> float:
    """RiV = length of the mean of the vectors Con * (cos Vol, sin Vol).

    Vol in [0, 1] radians gives cos(0.5) * mean(Con) <= RiV <= mean(Con).

    >>> round(aggregate_vector([1.0, 1.0], [0.0, math.pi / 2]), 6)  # |(0.5, 0.5)|
    0.707107
    """
    x = math.fsum(c * math.cos(v) for c, v in zip(cons, vols)) / len(cons)
    y = math.fsum(c * math.sin(v) for c, v in zip(cons, vols)) / len(cons)
    return math.hypot(x, y)


def aggregate_consistency(cons: Sequence[float], vols: Sequence[float]) -> float:
    """Ablation: mean(Con); `vols` is ignored."""
    return math.fsum(cons) / len(cons)


def aggregate_volatility(cons: Sequence[float], vols: Sequence[float]) -> float:
    """Ablation: mean(1 - Vol); `cons` is ignored."""
    return math.fsum(1.0 - v for v in vols) / len(vols)


AGGREGATIONS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "linear": aggregate_linear,
    "vector": aggregate_vector,
    "consistency": aggregate_consistency,
    "volatility": aggregate_volatility,
}


def _kl_to_uniform(nll: Tensor) -> Tensor:
    """KL(P || U) with P = nll / sum(nll) over the step's L tokens (0 log 0 = 0).

    A step whose NLLs are all 0 carries no preference among its tokens: P is taken as U (KL 0).
    """
    nll = nll.double().clamp_min(0.0)
    total = nll.sum()
    if total <= 0:
        return total.new_zeros(())
    p = nll / total
    p_log_p = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return (p_log_p.sum() + math.log(p.numel())).clamp_min(0.0)


def curiosity_paper(step_nlls: list[Tensor]) -> float:
    """Mean over steps of mean NLL - ln(KL(P || U) + 1); `step_nlls[k]` is step k's token NLLs."""
    values = [nll.double().mean() - torch.log1p(_kl_to_uniform(nll)) for nll in step_nlls]
    return torch.stack(values).mean().item()


def curiosity_released(step_nlls: list[Tensor]) -> float:
    """Mean over steps of exp(mean NLL) - ln(KL(P || U)^(1/3) + 1), the released code's form."""
    values = [
        torch.exp(nll.double().mean()) - torch.log1p(_kl_to_uniform(nll) ** (1 / 3))
        for nll in step_nlls
    ]
    return torch.stack(values).mean().item()


def _as_bonus(value: float) -> float:
    return value


def released_bonus(value: float) -> float:
    """The released code's bonus: 0.4 when the curiosity exceeds 2, else 0."""
    return 0.4 if value > 2 else 0.0


class CuriosityForm(NamedTuple):
    """`value` maps per-step NLLs to the logged curiosity; `bonus` maps it to the reward term."""

    value: Callable[[list[Tensor]], float]
    bonus: Callable[[float], float]


CURIOSITY_FORMS: dict[str, CuriosityForm] = {
    "released": CuriosityForm(curiosity_released, released_bonus),
    "paper": CuriosityForm(curiosity_paper, _as_bonus),
}
