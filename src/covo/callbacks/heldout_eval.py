"""Held-out accuracy while training: at the base (step 0), every `every_n_optimizer_steps`
optimizer steps, and after the last one.

On fixed held-out problems it samples `num_samples` responses per problem at `temperature`
and one greedy response, and grades them against the labels (the labels are read here only,
never by the reward): `sampled_accuracy` is the mean over problems of the share of correct
samples, `greedy_accuracy` the share of problems whose greedy response is correct,
`maj_accuracy` the share whose majority answer over the samples is correct (maj@N). Each
evaluation is one JSONL line `{"step", "sampled_accuracy", "greedy_accuracy", "maj_accuracy",
...}` in `path`, and `heldout/<metric>` in every logger, both at x = `trainer.global_step`
(optimizer steps). Sampling draws from its own seeded generator state, so evaluating does not
change what the run trains on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback

from covo.answers import AnswerEquivalence, get_extractor
from covo.eval.harness import sample_responses
from covo.eval.metrics import maj_at_k
from covo.models.loading import LoadedModel

log = logging.getLogger(__name__)
METRICS = ("sampled_accuracy", "greedy_accuracy", "maj_accuracy")


def heldout_metrics(
    sampled: list[list[str]], greedy: list[str], labels: list[str], extract, equivalence
) -> dict[str, float]:
    """Sampled accuracy (mean over problems of the correct share of its samples), greedy
    accuracy and maj@N from each problem's N sampled texts, its greedy text and its label."""
    sampled_share, greedy_hits, maj_hits = [], [], []
    for texts, greedy_text, label in zip(sampled, greedy, labels, strict=True):
        answers = [extract(text) for text in texts]
        correct = [equivalence.is_correct(answer, label) for answer in answers]
        sampled_share.append(sum(correct) / len(correct))
        greedy_hits.append(float(equivalence.is_correct(extract(greedy_text), label)))
        maj_hits.append(maj_at_k(answers, correct, len(answers), equivalence.equivalent))
    n = len(labels)
    return {
        "sampled_accuracy": sum(sampled_share) / n,
        "greedy_accuracy": sum(greedy_hits) / n,
        "maj_accuracy": sum(maj_hits) / n,
    }


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class HeldoutEval(Callback):
    """`problems`: items `{"problem", "answer"}`; `prompt_template` formats `{problem}`."""

    def __init__(
        self,
        problems: list[dict],
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
        self.problems = list(problems)
        if not self.problems:
            raise ValueError(f"{key}.problems: no items")
        if "{problem}" not in prompt_template:
            raise ValueError(f"{key}.prompt_template must contain '{{problem}}'")
        self.prompts = [prompt_template.format(problem=p["problem"]) for p in self.problems]
        self.labels = [str(p["answer"]) for p in self.problems]
        self.every = every_n_optimizer_steps
        sampling = {"max_new_tokens": max_new_tokens, "top_p": 1.0, "dtype": None}
        self.sampling = SimpleNamespace(
            num_samples=num_samples, temperature=temperature, batch_size=batch_size, **sampling
        )
        self.greedy = SimpleNamespace(
            num_samples=1, temperature=0.0, batch_size=batch_size * num_samples, **sampling
        )
        self.extract = get_extractor(extractor)
        self.equivalence = AnswerEquivalence()
        self.seed = seed
        self.path = Path(path)
        self.done: set[int] = set()

    def generate(self, loaded: LoadedModel) -> tuple[list[list[str]], list[str]]:
        """The sampled texts [M][N] and the greedy text of each problem."""
        sampled, _ = sample_responses(loaded, self.prompts, self.sampling, desc="heldout")
        greedy, _ = sample_responses(loaded, self.prompts, self.greedy, desc="heldout greedy")
        return sampled, [texts[0] for texts in greedy]

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict:
        step = trainer.global_step
        policy = pl_module.policy
        training = policy.training
        # sampling only: the update's hold_graphs plays no part here
        loaded = LoadedModel(
            policy, pl_module.tokenizer, pl_module.chat_template, "policy", hold_graphs=False
        )
        policy.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed + step)
            sampled, greedy = self.generate(loaded)
        policy.train(training)
        record = {
            "step": step,
            **heldout_metrics(sampled, greedy, self.labels, self.extract, self.equivalence),
        }
        record |= {"problems": len(self.labels), "num_samples": self.sampling.num_samples}
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for logger in trainer.loggers:
                logger.log_metrics({f"heldout/{m}": record[m] for m in METRICS}, step=step)
        self.done.add(step)
        log.info(
            "held-out at step %d: sampled %.3f, greedy %.3f, maj@%d %.3f",
            step,
            record["sampled_accuracy"],
            record["greedy_accuracy"],
            self.sampling.num_samples,
            record["maj_accuracy"],
        )
        return record

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run: evaluations past the checkpoint's step are redone by this run
        kept = [r for r in read_records(self.path) if r["step"] <= trainer.global_step]
        if trainer.is_global_zero and self.path.is_file():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.done = {r["step"] for r in kept}
        if trainer.global_step not in self.done:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step not in self.done:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step not in self.done:
            self.evaluate(trainer, pl_module)
