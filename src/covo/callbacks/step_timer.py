"""Wall time of every training step with the module's per-phase times, for benchmarks."""

from __future__ import annotations

import time

import lightning.pytorch as L


class StepTimer(L.Callback):
    """`steps[i]`: step i's `step_s` (batch start to end, wall time), `cpu_s` (this process's
    CPU time over the same span: on a busy machine, what one thread's step costs), the
    module's `time/...` phases and its scoring token counts."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        row = {
            "step_s": time.perf_counter() - self.start,
            "cpu_s": time.process_time() - self.cpu_start,
            **module.timings,
        }
        row["scoring_tokens"] = module.scoring_counts["perf/scoring_tokens"]
        row["reused_tokens"] = module.scoring_counts["perf/scoring_reused_tokens"]
        self.steps.append(row)
