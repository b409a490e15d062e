#!/usr/bin/env bash
# The long runs behind the verdict (docs/outcomes.md), each resumable: rerun the same command
# and finished runs are kept, the others resume. They write outside the checkout (training
# studies under ${COVO_OUTCOMES_DIR:-~/.cache/covo/outcomes}, the premise study under
# ${COVO_STUDY_DIR:-~/.cache/covo/studies}), so an interrupted sitting goes on in the next one.
#   bash scripts/verdict_runs.sh headline   # 6 rewards x 10 seeds, calibrated lab, lr 3.3e-5, KL 0.1
#   bash scripts/verdict_runs.sh predict    # the prediction's setting: 10 rewards x 3 seeds, lr 5e-5, KL 0.1
#   bash scripts/verdict_runs.sh premise qwen_coder_15b   # CoVo's premise on a model (here the
#       1.5B of the qwen15 extra; also qwen_coder_05b, smollm2_135m), on the 64 three-operand
#       problems, in bf16 where the CPU computes it natively (3x fp32's matmul rate on an
#       AVX512-BF16 EPYC: scripts/bench_precision.py --layer), else fp32; COVO_PREMISE_DTYPE=float32 forces one
# Each runs one process on one core at the lowest priority (nice 19), so other work goes first;
# further arguments are overrides of that study (two at once: `... predict cores=[1]`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${COVO_OUTCOMES_DIR:-$HOME/.cache/covo/outcomes}
studies=${COVO_STUDY_DIR:-$HOME/.cache/covo/studies}
python=${PYTHON:-.venv/bin/python}
lab='"experiment=toy_calibrated_learns","callbacks.heldout_eval.batch_size=32","callbacks.heldout_eval.extractor=boxed"'
run() { OMP_NUM_THREADS=1 nice -n 19 "$python" "$@"; }
what=${1:?usage: scripts/verdict_runs.sh headline|predict|premise MODEL [overrides]}
shift
case "$what" in
  headline)
    run -m covo.analysis.outcomes name=headline_lr3.3e-5_kl0.1 hydra.run.dir="$out/headline_lr3.3e-5_kl0.1" \
      train.model=toy_calibrated train.data=toy_calibrated \
      'rewards=[ground_truth,majority,covo,covo_paper,random,seq_logprob]' \
      seeds=10 jobs=1 train.steps=60 eval_every=10 'baselines=[random,ground_truth]' \
      "train.extra=[$lab,\"optimizer.lr=3.3e-5\",\"algorithm.kl_coef=0.1\"]" "$@" ;;
  predict)
    run -m covo.analysis.outcomes name=predict_lr5e-5_kl0.1 hydra.run.dir="$out/predict_lr5e-5_kl0.1" \
      train.model=toy_calibrated train.data=toy_calibrated \
      'rewards=[seq_logprob,vote_share,majority,entropy,covo_guarded,covo,covo_paper,self_certainty,random,ground_truth]' \
      seeds=3 jobs=1 train.steps=60 eval_every=10 'baselines=[random,ground_truth]' \
      "train.extra=[$lab,\"optimizer.lr=5e-5\",\"algorithm.kl_coef=0.1\"]" "$@" ;;
  premise)
    model=${1:?usage: scripts/verdict_runs.sh premise MODEL [overrides]}
    shift
    native='from covo.infra.hardware import cpu_has_native_bf16 as bf16; print("bfloat16" if bf16() else "float32")'
    dtype=${COVO_PREMISE_DTYPE:-$("$python" -c "$native")}
    run -m covo.study model="$model" model.master_dtype="$dtype" threads=1 device=cpu \
      reward_extractor=boxed_or_last_number \
      'rewards=[covo,covo_paper,majority,self_certainty,entropy,seq_logprob]' \
      hydra.run.dir="$studies/$model" "$@" ;;
  *) echo "usage: scripts/verdict_runs.sh headline|predict|premise MODEL" >&2; exit 2 ;;
esac
