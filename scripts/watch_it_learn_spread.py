"""The README's watch-it-learn experiment over seeds, run as a user runs it, on this CPU.

    python scripts/watch_it_learn_spread.py --seeds 0 1 2 3 4 5 6 7 8 9 --cores 0 1
    python scripts/watch_it_learn_spread.py --fp32 --out logs/watch_fp32 ...   # the fp32 path

Each seed is `python train.py experiment=toy_reasoner_learns seed=<s>` in its own process
pinned to one of `--cores` (one torch thread, the experiment's own setting), its run directory
under `--out`; the script reads the run's greedy `val/accuracy` (64 held-out problems) from its
TensorBoard logs and prints, per seed, the first and the last validation and the rise between
them, then the mean, the minimum and the seeds below `--floor`. A seed with a finished
`rise.json` is not run again, so an interrupted sweep resumes. `--fp32` forces the float32
path on a CPU with bf16 (torch held to AVX2 and `COVO_NATIVE_BF16=0`, docs/precision.md).
Extra arguments after `--` are more Hydra overrides for every run. `--plot PATH` draws every
seed's curve and their mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from covo.analysis.plots import save_figure
from covo.analysis.report import read_scalars

ROOT = Path(__file__).resolve().parents[1]
FP32_ENV = {  # docs/precision.md: the float32 path on a CPU that has bf16
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "COVO_NATIVE_BF16": "0",
}
RESULT = "rise.json"


def run_seed(seed: int, out: Path, core: int, fp32: bool, overrides: list[str]) -> dict:
    """Train one seed (unless finished) and return its first, last and rise of val/accuracy."""
    run_dir = out / f"seed_{seed}"
    if (run_dir / RESULT).is_file():
        return json.loads((run_dir / RESULT).read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        "taskset", "-c", str(core), sys.executable, str(ROOT / "train.py"),
        "experiment=toy_reasoner_learns", f"seed={seed}", f"hydra.run.dir={run_dir}",
        "export_dir=null", *overrides,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (FP32_ENV if fp32 else {})
    with open(run_dir / "train.log", "w") as log:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=log).returncode
    if status != 0:
        raise SystemExit(f"error: seed {seed} failed (exit {status}); see {run_dir / 'train.log'}")
    accuracy = read_scalars(run_dir)["val/accuracy"]
    steps, values = zip(*sorted(accuracy))
    result = {
        "seed": seed,
        "steps": list(steps),
        "accuracy": list(values),
        "first": values[0],
        "last": values[-1],
        "rise": values[-1] - values[0],
    }
    (run_dir / RESULT).write_text(json.dumps(result))
    return result


def spread_figure(results: list[dict]) -> Figure:
    """Every seed's greedy val/accuracy curve (thin) and their mean (thick)."""
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in results:
        ax.plot(r["steps"], r["accuracy"], color="tab:blue", alpha=0.35, linewidth=1)
    steps = results[0]["steps"]
    mean = [statistics.fmean(r["accuracy"][i] for r in results) for i in range(len(steps))]
    ax.plot(steps, mean, color="tab:blue", linewidth=2.5, label=f"mean of {len(results)} seeds")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("greedy val/accuracy (64 problems)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--cores", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "watch_it_learn")
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--floor", type=float, default=0.05)
    parser.add_argument("--plot", type=Path, help="draw every seed's curve here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    free: Queue = Queue()
    for core in args.cores:
        free.put(core)

    def one(seed: int) -> dict:
        core = free.get()
        try:
            return run_seed(seed, args.out, core, args.fp32, args.overrides)
        finally:
            free.put(core)

    with ThreadPoolExecutor(max_workers=len(args.cores)) as pool:
        results = list(pool.map(one, args.seeds))
    print("| seed | first val/accuracy | last | rise |\n|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['seed']} | {r['first']:.3f} | {r['last']:.3f} | {r['rise']:+.3f} |")
    rises = [r["rise"] for r in results]
    low = [r["seed"] for r in results if r["rise"] < args.floor]
    print(
        f"\nrise: mean {statistics.fmean(rises):+.3f}, min {min(rises):+.3f}, max {max(rises):+.3f}"
        f" over {len(rises)} seeds; below {args.floor:+.2f}: {low or 'none'}"
    )
    if args.plot:
        save_figure(spread_figure(results), args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
