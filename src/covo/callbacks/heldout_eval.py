"""Held-out accuracy while training, on a validation and a test split: at the base (step 0),
every `every_n_optimizer_steps` optimizer steps, and after the last one.

Every choice (lr, KL, steps, the peak) reads the validation split; the test split is for
reporting only. On each split's fixed problems it samples `num_samples` responses per problem
at `temperature` and one greedy response, and grades them against the labels (the labels are
read here only, never by the reward). Per problem it keeps the number of correct samples and
whether the greedy response and the majority answer of the samples (maj@N) are right; the
split's accuracies are means over its problems: `sampled_accuracy` (the correct share of the
samples), `greedy_accuracy`, `maj_accuracy` and `pass_accuracy` (at least one correct
sample). Each evaluation writes one JSONL line per split into `path`:
`{"step", "split", "problems", "num_samples", "sampled_accuracy", "greedy_accuracy",
"maj_accuracy", "pass_accuracy", "per_problem_correct", "per_problem_greedy",
"per_problem_maj"}` (per-problem lists in the split's fixed order), and logs
`heldout/<split>/<metric>` in every logger, both at x = `trainer.global_step` (optimizer steps).
Lines without "split" (written before there was a test split) are validation's.

Generation runs on the rollout's replica through the rollout's engine (`module.sampler`,
refreshed here: under FSDP2 the weights are gathered once, not at every decoded token). The
problems are cut into fixed chunks of `batch_size`, dealt to the ranks in turn and gathered;
each chunk samples from its own seed, drawn from (seed, step, split, chunk): the records do not
depend on the number of ranks, and no two runs' seeds share an evaluation's draws. Every
random generator (torch's on the CPU and on every GPU, Python's, NumPy's) is restored after an
evaluation, so evaluating does not change what the run trains on.
"""

from __future__ import annotations

import json
import logging
import math
import random
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from covo.answers import AnswerEquivalence, get_extractor
from covo.eval.harness import sample_responses
from covo.eval.metrics import maj_at_k
from covo.infra import distributed as dist
from covo.models.loading import LoadedModel

log = logging.getLogger(__name__)
SPLITS = ("validation", "test")  # a split's index here is part of its sampling seeds
METRICS = ("sampled_accuracy", "greedy_accuracy", "maj_accuracy", "pass_accuracy")
PER_PROBLEM = ("per_problem_correct", "per_problem_greedy", "per_problem_maj")


def problem_results(
    sampled: list[list[str]], greedy: list[str], labels: list[str], extract, equivalence
) -> dict[str, list[int]]:
    """Per problem, from its N sampled texts, its greedy text and its label: the number of
    correct samples, and 1 or 0 for the greedy response and for the majority answer."""
    results = {key: [] for key in PER_PROBLEM}
    for texts, greedy_text, label in zip(sampled, greedy, labels, strict=True):
        answers = [extract(text) for text in texts]
        correct = [equivalence.is_correct(answer, label) for answer in answers]
        results["per_problem_correct"].append(sum(correct))
        results["per_problem_greedy"].append(
            int(equivalence.is_correct(extract(greedy_text), label))
        )
        majority = maj_at_k(answers, correct, len(answers), equivalence.equivalent)
        results["per_problem_maj"].append(int(majority))
    return results


def split_metrics(results: dict[str, list[int]], num_samples: int) -> dict[str, float]:
    """A split's accuracies from its per-problem results (`problem_results`)."""
    correct = results["per_problem_correct"]
    n = len(correct)
    return {
        "sampled_accuracy": sum(correct) / (n * num_samples),
        "greedy_accuracy": sum(results["per_problem_greedy"]) / n,
        "maj_accuracy": sum(results["per_problem_maj"]) / n,
        "pass_accuracy": sum(count > 0 for count in correct) / n,
    }


def evaluation_seed(seed: int, step: int, split: str, chunk: int) -> int:
    """The sampling seed of one chunk of a split's problems at one evaluation: NumPy's
    SeedSequence hashes the whole tuple, so distinct tuples draw apart (a sum such as
    seed + step gave seed 0 at step 5 the draws of seed 1 at step 4)."""
    entropy = [seed, step, SPLITS.index(split), chunk]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


@contextmanager
def generators_restored():
    """Every random generator as it was before the block: torch's on the CPU and on every
    CUDA device, Python's and NumPy's."""
    python, numpy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def read_records(path: Path, split: str | None = None) -> list[dict]:
    """The records of `path` (of `split` only, when given); a line without "split" is
    validation's."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        record.setdefault("split", "validation")
    return [r for r in records if split is None or r["split"] == split]


class HeldoutEval(Callback):
    """`validation`, `test` (None: no test split): items `{"problem", "answer"}`;
    `prompt_template` formats `{problem}`."""

    def __init__(
        self,
        validation: list[dict],
        test: list[dict] | None,
        prompt_template: str,
        every_n_optimizer_steps: int,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        batch_size: int,
        extractor: str,
        seed: int,
        path: str,
    ):
        key = "callbacks.heldout_eval"
        if every_n_optimizer_steps < 1:
            raise ValueError(
                f"{key}.every_n_optimizer_steps must be >= 1, got {every_n_optimizer_steps}"
            )
        if num_samples < 1 or max_new_tokens < 1 or batch_size < 1 or temperature <= 0:
            raise ValueError(
                f"{key}: num_samples, max_new_tokens and batch_size must be >= 1 and "
                f"temperature > 0, got {num_samples}, {max_new_tokens}, {batch_size}, {temperature}"
            )
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{key}.seed must be an integer >= 0, got {seed!r}")
        if "{problem}" not in prompt_template:
            raise ValueError(f"{key}.prompt_template must contain '{{problem}}'")
        splits = {"validation": validation} | ({"test": test} if test is not None else {})
        self.prompts, self.labels = {}, {}
        for split, problems in splits.items():
            if not problems:
                raise ValueError(f"{key}.{split}: no items")
            self.prompts[split] = [prompt_template.format(problem=p["problem"]) for p in problems]
            self.labels[split] = [str(p["answer"]) for p in problems]
        self.every = every_n_optimizer_steps
        sampling = {"max_new_tokens": max_new_tokens, "top_p": 1.0, "dtype": None}
        # a chunk of problems is one generate call, sampled and greedy alike
        self.sampling = SimpleNamespace(
            num_samples=num_samples, temperature=temperature, batch_size=batch_size, **sampling
        )
        self.greedy = SimpleNamespace(
            num_samples=1, temperature=0.0, batch_size=batch_size, **sampling
        )
        self.extract = get_extractor(extractor)
        self.equivalence = AnswerEquivalence()
        self.seed = seed
        self.path = Path(path)
        self.done: dict[str, set[int]] = {split: set() for split in self.prompts}

    def evaluate_split(self, loaded, engine, split: str, step: int, rank: int, world: int):
        """This split's record at `step`: each rank generates its chunks, then all gather."""
        prompts, labels, size = self.prompts[split], self.labels[split], self.sampling.batch_size
        mine = {}
        for chunk in range(rank, math.ceil(len(prompts) / size), world):
            part = slice(chunk * size, (chunk + 1) * size)
            torch.manual_seed(evaluation_seed(self.seed, step, split, chunk))
            sampled, _ = sample_responses(
                loaded, prompts[part], self.sampling, f"heldout {split}", engine
            )
            greedy, _ = sample_responses(
                loaded, prompts[part], self.greedy, f"heldout {split} greedy", engine
            )
            greedy_texts = [texts[0] for texts in greedy]
            mine[chunk] = problem_results(
                sampled, greedy_texts, labels[part], self.extract, self.equivalence
            )
        chunks = {c: r for every in dist.all_gather_objects(mine) for c, r in every.items()}
        results = {key: [v for c in sorted(chunks) for v in chunks[c][key]] for key in PER_PROBLEM}
        num_samples = self.sampling.num_samples
        return {
            "step": step,
            "split": split,
            "problems": len(labels),
            "num_samples": num_samples,
            **split_metrics(results, num_samples),
            **results,
        }

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        """Every split not yet evaluated at this step; every rank takes part."""
        step = trainer.global_step
        due = [split for split in self.prompts if step not in self.done[split]]
        if not due:
            return
        sampler = pl_module.sampler
        model = sampler.view(pl_module.policy)  # the rollout's replica, refreshed
        loaded = LoadedModel(
            model, pl_module.tokenizer, pl_module.chat_template, "policy", hold_graphs=False
        )
        training = model.training
        model.eval()
        with generators_restored(), torch.no_grad():
            records = [
                self.evaluate_split(
                    loaded, sampler.cfg.engine, split, step, trainer.global_rank,
                    trainer.world_size,
                )
                for split in due
            ]  # fmt: skip
        model.train(training)
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))
            metrics = {f"heldout/{r['split']}/{m}": r[m] for r in records for m in METRICS}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        for record in records:
            self.done[record["split"]].add(step)
            log.info(
                "held-out %s at step %d: sampled %.3f, greedy %.3f, maj@%d %.3f, pass@%d %.3f",
                record["split"],
                step,
                record["sampled_accuracy"],
                record["greedy_accuracy"],
                record["num_samples"],
                record["maj_accuracy"],
                record["num_samples"],
                record["pass_accuracy"],
            )

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run: evaluations past the checkpoint's step are redone by this run. Rank 0
        # reads and decides, so ranks without a shared disk evaluate the same steps
        kept = []
        if trainer.is_global_zero:
            kept = [r for r in read_records(self.path) if r["step"] <= trainer.global_step]
            if self.path.is_file():
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        kept = dist.all_gather_objects(kept)[0]
        self.done = {
            split: {r["step"] for r in kept if r["split"] == split} for split in self.prompts
        }
        self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)
