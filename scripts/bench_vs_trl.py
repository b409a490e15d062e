"""Step time of this trainer against TRL's GRPOTrainer on identical work, side by side.

The work: SmolLM2-135M-Instruct, 4 prompts x 8 samples per step ("What is a + b?", a and b in
10..99), up to 64 new tokens at temperature 1, GRPO's group-normalised advantage, no KL, fp32,
lr 1e-6 constant, AdamW (0.9, 0.999), micro-batches of 8 (one optimizer step per rollout), one
torch thread, every process pinned to the same core. Each variant runs in its own process;
variants alternate, and each round rotates their order.

  covo            ours, group filter off (identical work)
  covo_filter     ours, the default GRPO filter (all-equal groups skipped: with no KL their
                  advantage is zero, so the updates are identical)
  covo_gc         ours, group filter off, gradient checkpointing on (as TRL's defaults)
  trl             TRL GRPOTrainer, its defaults but fp32 (gradient checkpointing on)
  trl_no_gc       TRL, gradient checkpointing off
  covo_rewarded   ours with reward=covo_last_number (the default run's CoVo), group filter off
  trl_covo        TRL, gradient checkpointing off, rewarded by CoVo through
                  covo.integrations.trl (scripts/trl_covo.py's wiring, the collapse guard
                  off as in covo_rewarded): the same work as covo_rewarded; its reward phase
                  includes its statistics pass (also shown under statistics)
  floor           one `generate` call plus one forward and backward of the same tokens
  reward_paths    no training: each step's rollout (covo's sampler, the work above) judged by
                  CoVo both ways in one process, on the same completions: covo's trainer's
                  scoring (statistics and keys/values from decoding) and the TRL integration's
                  (its batched statistics pass, then the reward), alternating which goes first
  covo_before     ours from another source tree (--before-src), group filter off

With --work default, ours (and covo_before) run the default training config instead
(`bash scripts/train.sh`'s run, its own data and group filter, 1 thread, no validation).

Per variant: median s/step over steps 2..N, completion tokens per second, mean completion
length, peak RSS, the phases (generate, statistics, reward, update) where known, and the
ratios to TRL and to the floor; with both covo_rewarded and trl_covo, the ratio of their
reward phases. TRL is the optional `bench` extra (`pip install -e .[bench]`).
The covo_rewarded, trl_covo and reward_paths variants run only when named:

python scripts/bench_vs_trl.py --variants trl_covo covo_rewarded --steps 3 --core 1
python scripts/bench_vs_trl.py --variants reward_paths --steps 4 --core 1

python scripts/bench_vs_trl.py --steps 6 --rounds 1 [--before-src OLD/src]
python scripts/bench_vs_trl.py --work default --steps 4 --before-src OLD/src
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SAMPLES, NEW_TOKENS, MICRO, LR = 4, 8, 64, 8, 1e-6
QUIET = [
    "logger=none",
    "callbacks=none",
    "export_dir=null",
    "+trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
]
OURS = [
    *QUIET,
    "reward=ground_truth",
    "algorithm=grpo",
    "algorithm.kl_coef=0",
    f"algorithm.micro_batch_size={MICRO}",
    "data=jsonl",
    "data.prompt_template='{problem}'",
    f"data.batch_size={PROMPTS}",
    f"rollout.num_samples={SAMPLES}",
    f"rollout.max_new_tokens={NEW_TOKENS}",
    "rollout.temperature=1.0",
    "trainer.precision=32-true",
    "rollout.dtype=null",
    f"optimizer.lr={LR}",
    "optimizer.betas=[0.9,0.999]",
    "optimizer.weight_decay=0.0",
    "scheduler=constant",
    "threads=1",
]
NO_FILTER = ["algorithm.filter.drop_all_zero=false", "algorithm.filter.drop_all_equal=false"]
PHASES = ["generate", "statistics", "reward", "update"]
VARIANTS = ["covo", "covo_filter", "covo_gc", "trl", "trl_no_gc", "floor"]


def problems(path: Path, count: int = 512) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---- children: each prints one JSON line {"steps": [...], "peak_rss_gb": ...} ----


def child_ours(
    data: Path | None, steps: int, no_filter: bool, out_dir: Path, extra: tuple[str, ...] = ()
) -> dict:
    """This trainer on the TRL work, or (`data` None) on the default training run's config."""
    import lightning.pytorch as L
    from omegaconf import open_dict

    import covo.rollout.sampling as rollout_module
    from covo.infra.configs import compose_run
    from covo.launch.train import build

    if data is None:
        overrides = [*QUIET, "threads=1", f"trainer.max_steps={steps}"]
    else:
        overrides = [*OURS, f"data.train.path={data}", f"trainer.max_steps={steps}"]
        overrides += NO_FILTER if no_filter else []
    overrides += list(extra)
    cfg = compose_run("train", overrides)
    rows_per_step = cfg.data.batch_size * cfg.rollout.num_samples
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    timed = {"generate_s": 0.0, "statistics_s": 0.0}
    time_generation(rollout_module, timed)
    L.seed_everything(cfg.seed, verbose=False)
    module, datamodule, trainer = build(cfg)
    rows = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            timed.update(generate_s=0.0, statistics_s=0.0)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step_s = time.perf_counter() - self.start
            metrics = trainer.callback_metrics
            rollout_s = module.timings["time/rollout_s"]
            rows.append(
                {
                    "step_s": step_s,
                    "tokens": float(metrics["rollout/len_mean"]) * rows_per_step,
                    "mean_len": float(metrics["rollout/len_mean"]),
                    "generate_s": timed["generate_s"] - timed["statistics_s"],
                    "statistics_s": rollout_s - timed["generate_s"] + timed["statistics_s"],
                    "reward_s": module.timings["time/reward_s"],
                    "update_s": module.timings["time/update_s"],
                }
            )

    trainer.callbacks.append(Timer())
    trainer.fit(module, datamodule=datamodule)
    return {"steps": rows}


def time_generation(rollout_module, timed: dict) -> None:
    """Time spent decoding, and inside it in the statistics processor (where there is one)."""

    def timer(fn, key):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timed[key] += time.perf_counter() - start

        return wrapped

    try:
        import covo.rollout.engine as engine

        engine.HFGenerate.__call__ = timer(engine.HFGenerate.__call__, "generate_s")
        stats = engine.SamplingStatistics
        stats.__call__ = timer(stats.__call__, "statistics_s")
        stats.finish = timer(stats.finish, "statistics_s")
    except ImportError:  # a tree from before the engines: generate, then a forward
        rollout_module.generate = timer(rollout_module.generate, "generate_s")


def child_trl(
    data: Path, steps: int, checkpointing: bool | None, out_dir: Path, covo_reward: bool = False
) -> dict:
    """TRL's GRPOTrainer rewarded by answer correctness, or (`covo_reward`) by CoVo."""
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        sys.exit("TRL is not installed: pip install -e .[bench]")
    from covo.answers import AnswerEquivalence, get_extractor
    from covo.integrations.trl import CovoReward, grpo_trainer
    from covo.models.loading import load_smollm2

    loaded = load_smollm2(cache_dir=str(Path("~/.cache/covo").expanduser()))
    items = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": i["problem"]}], "answer": i["answer"]}
            for i in items
        ]
    )
    extract, same = get_extractor("boxed_or_last_number"), AnswerEquivalence()

    def correct(completions, answer, **_):
        return [
            float(same.is_correct(extract(c[0]["content"]), a)) for c, a in zip(completions, answer)
        ]

    extra = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    config = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=PROMPTS * SAMPLES // MICRO,
        num_generations=SAMPLES,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        beta=0.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **extra,
    )
    rows = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            rows.append({"step_s": time.perf_counter() - self.start})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs and rows:
                rows[-1]["tokens"] = float(logs["completions/mean_length"]) * PROMPTS * SAMPLES
            if logs and "time/reward_s" in logs and rows:  # logged by the covo reward
                rows[-1]["reward_s"] = float(logs["time/reward_s"])
                rows[-1]["statistics_s"] = float(logs["time/statistics_s"])
                rows[-1]["from_generate"] = float(logs.get("perf/stats_from_generate", 0.0))

    setup = dict(
        model=loaded.model,
        processing_class=loaded.tokenizer,
        args=config,
        train_dataset=dataset,
        callbacks=[Timer()],
    )
    if covo_reward:  # judged as ours judges in the default run
        reward = CovoReward("covo_last_number", ["callbacks.collapse_guard=null"])
        trainer = grpo_trainer(reward, **setup)
    else:
        trainer = GRPOTrainer(reward_funcs=correct, **setup)
    trainer.train()
    return {"steps": rows, "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


def child_floor(data: Path, steps: int) -> dict:
    """One `generate` call over the step's prompts, then one forward and backward per
    micro-batch of the same tokens (the log-probs of the sampled tokens), nothing else."""
    import torch

    from covo.models.loading import load_smollm2

    loaded = load_smollm2(cache_dir=str(Path("~/.cache/covo").expanduser()))
    model, tok = loaded.model, loaded.tokenizer
    items = [json.loads(line) for line in data.read_text().splitlines()]
    torch.manual_seed(0)
    rows = []
    for step in range(steps):
        batch = items[step * PROMPTS : (step + 1) * PROMPTS]
        chats = [
            tok.apply_chat_template(
                [{"role": "user", "content": i["problem"]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for i in batch
        ]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=NEW_TOKENS,
                num_return_sequences=SAMPLES,
                pad_token_id=tok.pad_token_id,
            )
        generated = time.perf_counter()
        model.train()
        prompt_len = enc["input_ids"].shape[1]
        response = out[:, prompt_len:]
        is_eos = (response == tok.eos_token_id).long()
        mask = ((is_eos.cumsum(1) - is_eos) == 0).float()
        attention = torch.cat([enc["attention_mask"].repeat_interleave(SAMPLES, 0), mask.long()], 1)
        for rows_ in range(0, len(out), MICRO):
            part = slice(rows_, rows_ + MICRO)
            # logits only where a response token is predicted
            logits = model(
                input_ids=out[part],
                attention_mask=attention[part],
                logits_to_keep=response.shape[1] + 1,
            ).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            chosen = logp.gather(-1, response[part, :, None])[..., 0]
            (-(chosen * mask[part]).sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)
        end = time.perf_counter()
        rows.append(
            {
                "step_s": end - start,
                "tokens": float(mask.sum()),
                "generate_s": generated - start,
                "update_s": end - generated,
            }
        )
    return {"steps": rows}


def judged_as_covo(reward, model, tokenizer, rollout, step: int) -> tuple[list, dict]:
    """covo's trainer's reward phase: its scoring of the rollout."""
    from covo.rewards.scoring import score_rollout

    start = time.perf_counter()
    scored = score_rollout(reward, model, tokenizer, rollout, [None] * PROMPTS, step, 0)
    return scored.rewards.tolist(), {"reward_s": time.perf_counter() - start}


def judged_through_trl(reward, model, tokenizer, rollout, budget: int) -> tuple[list, dict]:
    """The TRL integration's reward phase on the same completions: its statistics pass
    (`group_from_ids`), then the reward on those groups."""
    from covo.rewards.base import label_for
    from covo.rewards.covo.scorer import PrefixSharedScorer
    from covo.rollout.groups import group_from_ids

    start, groups = time.perf_counter(), []
    for b, prompt_ids in enumerate(rollout.prompt_ids):
        rows = slice(b * SAMPLES, (b + 1) * SAMPLES)
        responses, texts = rollout.response_ids[rows], rollout.texts[rows]
        truth = label_for(reward, None)
        groups.append(
            group_from_ids(
                model, prompt_ids, responses, texts, truth, True, 1.0, token_budget=budget
            )
        )
    statistics_s = time.perf_counter() - start
    scorer = PrefixSharedScorer(model, tokenizer)
    rewards = [r for group in groups for r in reward(group, scorer).rewards]
    seconds = {"trl_reward_s": time.perf_counter() - start, "trl_statistics_s": statistics_s}
    return rewards, seconds


def child_reward_paths(data: Path, steps: int) -> dict:
    """Each step's rollout judged by `reward=covo_last_number` both ways, on the same
    completions, alternating which goes first; the rewards must agree."""
    import functools

    import torch

    from covo.infra.checks import instantiate
    from covo.integrations.trl import integration_config
    from covo.integrations.trl.config import device_token_budget
    from covo.models.loading import load_smollm2
    from covo.rollout.sampling import build_rollout, format_prompts

    loaded = load_smollm2(cache_dir=str(Path("~/.cache/covo").expanduser()))
    model, tok = loaded.model.eval(), loaded.tokenizer
    cfg = integration_config("covo_last_number")
    reward = instantiate(cfg.reward)
    budget = cfg.stats_token_budget or device_token_budget(model)
    items = [json.loads(line) for line in data.read_text().splitlines()]
    torch.manual_seed(0)
    rows = []
    for step in range(steps):
        batch = [i["problem"] for i in items[step * PROMPTS : (step + 1) * PROMPTS]]
        prompts = format_prompts(tok, batch, True)
        rollout = build_rollout(model, tok, prompts, SAMPLES, NEW_TOKENS, 1.0, 1.0, keep_cache=True)
        judges = [
            functools.partial(judged_as_covo, reward, model, tok, rollout, step),
            functools.partial(judged_through_trl, reward, model, tok, rollout, budget),
        ]
        if step % 2:  # alternate which goes first: the load of a shared machine drifts
            judges.reverse()
        (first, a), (second, b) = [judge() for judge in judges]
        if max(abs(x - y) for x, y in zip(first, second)) > 1e-4:
            sys.exit(f"step {step + 1}: the two paths' rewards differ: {first} {second}")
        row = {**a, **b, "tokens": float(sum(map(len, rollout.response_ids)))}
        rows.append({**row, "step_s": row["reward_s"] + row["trl_reward_s"]})
    return {"steps": rows}


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    out_dir = Path(tempfile.mkdtemp(prefix=f"covo-bench-{args.child}-"))
    if args.child in ("covo", "covo_filter", "covo_gc", "covo_rewarded", "covo_before"):
        data = args.data if args.work == "trl" else None
        extra = {
            "covo_gc": ("model.gradient_checkpointing=true",),
            "covo_rewarded": ("reward=covo_last_number",),
        }.get(args.child, ())
        result = child_ours(data, args.steps, args.child != "covo_filter", out_dir, extra)
    elif args.child in ("trl", "trl_no_gc", "trl_covo"):
        checkpointing = None if args.child == "trl" else False
        result = child_trl(args.data, args.steps, checkpointing, out_dir, args.child == "trl_covo")
    elif args.child == "reward_paths":
        result = child_reward_paths(args.data, args.steps)
    else:
        result = child_floor(args.data, args.steps)
    result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result), flush=True)


# ---- parent ----


def run_child(variant: str, args, data: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if variant == "covo_before":
        env["PYTHONPATH"] = str(Path(args.before_src).resolve())
    else:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    command = ["taskset", "-c", str(args.core), sys.executable, __file__, "--child", variant]
    command += ["--data", str(data), "--steps", str(args.steps), "--work", args.work]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def summarise(runs: list[dict]) -> dict:
    steps = [row for run in runs for row in run["steps"][1:]]  # steps 2..N of every round
    total_s = sum(row["step_s"] for row in steps)
    tokens = [row["tokens"] for row in steps if "tokens" in row]
    summary = {
        "s_per_step": statistics.median(row["step_s"] for row in steps),
        "tokens_per_s": sum(tokens) / total_s if tokens else float("nan"),
        "mean_len": statistics.mean(
            row.get("mean_len", row.get("tokens", float("nan")) / (PROMPTS * SAMPLES))
            for row in steps
        ),
        "peak_rss_gb": max(run["peak_rss_gb"] for run in runs),
    }
    for phase in [p + "_s" for p in PHASES] + ["trl_statistics_s", "trl_reward_s"]:
        if all(phase in row for row in steps):
            summary[phase] = statistics.median(row[phase] for row in steps)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--variants", nargs="+", help=f"default: {' '.join(VARIANTS)}")
    parser.add_argument(
        "--work",
        choices=["trl", "default"],
        default="trl",
        help="trl: the identical work above; default: the default run's config (ours only)",
    )
    parser.add_argument("--before-src", help="another tree's src/: adds the covo_before variant")
    parser.add_argument("--src", default=str(ROOT / "src"), help="the src/ whose trainer is ours")
    parser.add_argument("--json", help="write every step's numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    variants = args.variants or (VARIANTS if args.work == "trl" else ["covo"])
    variants = list(variants) + (["covo_before"] if args.before_src else [])
    data = Path(tempfile.mkdtemp(prefix="covo-bench-data-")) / "sums.jsonl"
    problems(data)
    runs = {variant: [] for variant in variants}
    for round_ in range(args.rounds):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for variant in order:
            start = time.perf_counter()
            runs[variant].append(run_child(variant, args, data))
            print(f"round {round_ + 1} {variant}: {time.perf_counter() - start:.0f} s", flush=True)
    table = {variant: summarise(results) for variant, results in runs.items()}
    print(f"\nmedian over steps 2-{args.steps}, {args.rounds} round(s), core {args.core}")
    print("| variant | s/step | tokens/s | mean len | peak RSS GB | " + " | ".join(PHASES) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, row in table.items():
        phases = [f"{row[p + '_s']:.1f}" if p + "_s" in row else "" for p in PHASES]
        print(
            f"| {variant} | {row['s_per_step']:.1f} | {row['tokens_per_s']:.1f}"
            f" | {row['mean_len']:.1f} | {row['peak_rss_gb']:.2f} | " + " | ".join(phases) + " |"
        )
    print()
    for ours in [v for v in variants if v.startswith("covo")]:
        peers = ("trl", "trl_no_gc", "trl_covo", "floor", "covo_before")
        for peer in [v for v in peers if v in table and v != ours]:
            ratio = table[ours]["s_per_step"] / table[peer]["s_per_step"]
            rss = table[ours]["peak_rss_gb"] / table[peer]["peak_rss_gb"]
            print(f"{ours} / {peer}: step {ratio:.3f}, peak RSS {rss:.3f}")
    if "reward_paths" in table:
        row = table["reward_paths"]
        print(
            f"same completions: TRL integration {row['trl_reward_s']:.1f} s (statistics"
            f" {row['trl_statistics_s']:.1f} s) / covo's trainer {row['reward_s']:.1f} s ="
            f" {row['trl_reward_s'] / row['reward_s']:.2f}"
        )
    if {"covo_rewarded", "trl_covo"} <= set(table):
        trl_s, ours_s = table["trl_covo"]["reward_s"], table["covo_rewarded"]["reward_s"]
        captured = [row.get("from_generate", 0.0) for r in runs["trl_covo"] for row in r["steps"]]
        print(
            f"reward phase trl_covo / covo_rewarded: {trl_s:.1f} s / {ours_s:.1f} s = "
            f"{trl_s / ours_s:.2f} (trl_covo's statistics from TRL's generate in "
            f"{sum(captured):g} of {len(captured)} steps)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "table": table}, indent=1))


if __name__ == "__main__":
    main()
