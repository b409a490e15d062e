"""What the local processor does fast."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


def set_threads(threads: int | None, processes: int = 1) -> None:
    """torch's CPU threads: `threads`, else the cores this process may use shared among the
    `processes` on the node (oversubscribed shared cores were seen 10x slower)."""
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads or max(1, cores // processes))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX). Without them,
    torch emulates bf16 on CPU and it runs several times slower than fp32.
    `COVO_NATIVE_BF16=0` (or 1) overrides the look-up: the fp32 path on a bf16 machine."""
    forced = os.environ.get("COVO_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str) -> str:
    """Lightning precision for `precision: auto`."""
    if accelerator in ("gpu", "cuda"):
        return (
            "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32"
        )
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def auto_dtype(accelerator: str) -> str | None:
    """Rollout replica dtype for `rollout.dtype: auto` (None = the fp32 policy itself)."""
    return "bfloat16" if auto_precision(accelerator).startswith("bf16") else None
