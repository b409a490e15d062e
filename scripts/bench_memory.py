"""Peak memory of a short run of the default config: default, LoRA, and FSDP2 on two processes.

taskset -c 0 python scripts/bench_memory.py [--steps 2] [--variants default,lora,fsdp2]
    [--json rows.json] [Hydra overrides, e.g. trainer=gpu]
python scripts/bench_memory.py --scale rows.json   # the first row's peak scaled to Qwen2.5-7B

Each variant runs in a process of its own (FSDP2: two), so no variant's peak hides in another's.
Per process it prints the peak resident set (CPU; the peak allocated memory on a GPU), the
resident set after the imports (before any model), and what the run holds: the policy's
parameters (trained and frozen; the local shard under FSDP2), the reference's own copy of the
weights (bytes the reference holds that the policy does not), the rollout replica, gradients
and optimizer state at an optimizer step, and what the training forwards save for the backward
pass at once (the largest micro-batch's, or all of a step's when `model.hold_graphs` holds
them, as the default run does): activations, and autocast's low-precision copies of the
weights. Every group
keeps its update (`algorithm.filter.drop_all_zero=false`), so every variant trains every step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as L
import torch
from omegaconf import open_dict

VARIANTS = {
    "default": [],
    "lora": ["model.lora.r=8"],
    "fsdp2": ["strategy=fsdp"],
    "lora_fsdp2": ["model.lora.r=8", "strategy=fsdp"],
}
SHORT_RUN = [
    "logger=none",
    "callbacks=none",
    "export_dir=null",
    "val_every_n_rollouts=1000",
    "rollout.max_new_tokens=16",
    "algorithm.filter.drop_all_zero=false",
    "threads=1",
]
MB = 2**20
GB = 1e9
RESULT = "RESULT "
QWEN25_7B_PARAMS = 7.62e9  # Qwen2.5-7B(-Instruct), embeddings included


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def storages(tensors) -> set[int]:
    return {local(t).untyped_storage().data_ptr() for t in tensors}


class MemoryProbe(L.Callback):
    """Gradient and optimizer-state bytes before each optimizer step, and what the training
    forwards save for the backward pass at once (the largest micro-batch's; every micro-batch's
    of the step where the module holds their graphs, `model.hold_graphs`): activations,
    and the low-precision copies of weights that autocast makes for each matmul (parameters
    themselves excluded)."""

    def __init__(self) -> None:
        self.grads = self.optimizer_state = self.activations = self.weight_casts = 0

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad for p in module.policy.parameters() if p.grad is not None]
        self.grads = max(self.grads, nbytes(grads))
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        self.optimizer_state = max(self.optimizer_state, nbytes(state))

    def watch(self, module) -> None:
        """Wrap where the training forwards run: the micro-batch loss, and the forwards that
        run ahead of it with their graphs held."""
        for name in ("micro_batch_loss", "forward_ahead"):
            setattr(module.updater, name, self.counted(module, getattr(module.updater, name)))

    def counted(self, module, forward):
        """`forward`, with the bytes its saved tensors take recorded."""
        # a cast of a weight: 2-D, shaped like one of them, no history but the cast
        shapes = {tuple(p.shape) for p in module.policy.parameters() if p.dim() == 2}

        def is_weight_cast(t: torch.Tensor) -> bool:
            history = type(t.grad_fn).__name__ if t.grad_fn is not None else None
            return tuple(t.shape) in shapes and history in (None, "ToCopyBackward0")

        def counted(*args, **kwargs):
            saved: dict[int, tuple[int, bool]] = {}

            def pack(t: torch.Tensor):
                base = t._base if t._base is not None else t
                if not isinstance(base, torch.nn.Parameter):
                    storage = local(t).untyped_storage()
                    saved[storage.data_ptr()] = (storage.nbytes(), is_weight_cast(base))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = forward(*args, **kwargs)
            casts = sum(n for n, cast in saved.values() if cast)
            self.weight_casts = max(self.weight_casts, casts)
            self.activations = max(self.activations, sum(n for n, _ in saved.values()) - casts)
            return out

        return counted


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def held(module) -> dict[str, int]:
    """Bytes of the weights the module holds, by role (this process's share)."""
    policy = list(module.policy.parameters())
    reference = list(module.reference.parameters()) if module.reference is not None else []
    own = storages(policy)
    replica = module.sampler.view.replica
    return {
        "params_trained": nbytes(p for p in policy if p.requires_grad),
        "params_frozen": nbytes(p for p in policy if not p.requires_grad),
        "reference_copy": nbytes(
            p for p in reference if local(p).untyped_storage().data_ptr() not in own
        ),
        "replica": nbytes(replica.parameters()) if replica is not None else 0,
    }


def child(variant: str, steps: int, overrides: list[str]) -> None:
    from covo.infra import distributed as dist
    from covo.infra.configs import compose_run
    from covo.launch.train import build

    cfg = compose_run(
        "train",
        [*VARIANTS[variant], f"trainer.max_steps={steps}", *SHORT_RUN, *overrides],
    )
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="covo-bench-memory-")
    L.seed_everything(cfg.seed, verbose=False)
    imports = resident_bytes()  # torch, transformers, Lightning: before any model
    module, datamodule, trainer = build(cfg)
    probe = MemoryProbe()
    probe.watch(module)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=datamodule)
    row = {
        "variant": variant,
        "rank": trainer.global_rank,
        "imports": imports,
        "peak": peak_bytes(),
        **held(module),
        "grads": probe.grads,
        "optimizer_state": probe.optimizer_state,
        "activations": probe.activations,
        "weight_casts": probe.weight_casts,
        "device": "cuda" if torch.cuda.is_initialized() else "cpu",
    }
    rows = dist.all_gather_objects(row)
    if trainer.global_rank == 0:
        for r in rows:
            print(RESULT + json.dumps(r), flush=True)


COLUMNS = [
    ("peak", "peak"),
    ("imports", "imports"),
    ("params_trained", "trained params"),
    ("params_frozen", "frozen params"),
    ("reference_copy", "reference copy"),
    ("replica", "rollout replica"),
    ("grads", "grads"),
    ("optimizer_state", "optimizer state"),
    ("activations", "activations"),
    ("weight_casts", "weight casts"),
]


def table(rows: list[dict]) -> str:
    header = "| variant | process | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{r[key] / MB:.1f}" for key, _ in COLUMNS]
        lines.append(f"| {r['variant']} | {r['rank']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaled_to_7b(rows: list[dict]) -> str:
    """The first row's peak times (Qwen2.5-7B's parameters / this model's): the recipe's
    settings on one unsharded process; activations grow with width and depth, not with the
    parameter count, so this is a first estimate, not a measurement."""
    row = rows[0]
    params = (row["params_trained"] + row["params_frozen"]) / 4  # fp32 master weights
    ratio = QWEN25_7B_PARAMS / params
    keys = ("params_trained", "params_frozen", "reference_copy", "replica", "grads")
    held = sum(row[key] for key in (*keys, "optimizer_state"))
    return "\n".join(
        [
            f"## 7B estimate ({row['variant']}, {row['device']})",
            "",
            f"- measured peak: {row['peak'] / MB:.0f} MiB with {params / 1e6:.1f} M parameters",
            f"- scaled by {QWEN25_7B_PARAMS / 1e9:.2f} B / {params / 1e6:.1f} M = {ratio:.1f}:"
            f" {row['peak'] * ratio / GB:.0f} GB on one unsharded process",
            "- of which weights, gradients and optimizer state (FSDP over 8 GPUs divides these"
            f" by 8): {held * ratio / GB:.0f} GB",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", default="default,lora,fsdp2", help=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process's own variant
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--scale", help="print the 7B estimate from a --json file; run nothing")
    args, overrides = parser.parse_known_args()
    if args.scale:
        print(scaled_to_7b(json.loads(Path(args.scale).read_text())))
        return
    if args.variant:
        child(args.variant, args.steps, overrides)
        return
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)]
        proc = subprocess.run([*cmd, *overrides], capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows += [
            json.loads(line[len(RESULT) :])
            for line in proc.stdout.splitlines()
            if line.startswith(RESULT)
        ]
        print(f"{variant}: done", file=sys.stderr, flush=True)
    peak = "peak allocated (GPU)" if rows[0]["device"] == "cuda" else "peak resident set"
    print(f"MiB per process; {peak}; {args.steps} optimizer steps")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
