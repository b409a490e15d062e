"""Media of a training step, for every logger that shows media: samples as a table,
reward-component histograms, the distance-curve figure."""

from __future__ import annotations

import torch

from covo.algorithms.update import crossed
from covo.analysis.plots import distance_curve_figure, figure_to_array
from covo.answers import AnswerEquivalence
from covo.metrics.diagnostics import consistency_volatility_values, distance_curves
from covo.metrics.step import sample_table
from covo.rewards.base import GroupReward
from covo.rollout.sampling import Rollout


class MediaWriter:
    """Media of each rollout whose step passes a multiple of `samples_every_n_steps` (sample
    tables) or `plots_every_n_steps` (reward-component histograms, the distance-curve figure),
    counting from the step of the last rollout that considered media (`last_step`; a resumed
    run sets it)."""

    def __init__(self, samples_every_n_steps: int, plots_every_n_steps: int):
        self.samples_every_n_steps = samples_every_n_steps
        self.plots_every_n_steps = plots_every_n_steps
        self.last_step = -1

    def __call__(
        self,
        boards: list,
        step: int,
        rollout: Rollout,
        results: list[GroupReward],
        labels: list[str | None],
        equivalence: AnswerEquivalence,
    ) -> None:
        """Media due at optimizer step `step` into each of `boards` (TensorBoard's SummaryWriter
        or an object with its `add_text`, `add_histogram`, `add_image`: `covo.metrics.loggers`);
        plots need every prompt's label."""
        before, self.last_step = self.last_step, step
        if crossed(before, step, self.samples_every_n_steps):
            table = sample_table(rollout, results, labels)
            for board in boards:
                board.add_text("samples", table, step)
        if not crossed(before, step, self.plots_every_n_steps) or None in labels:
            return
        values = consistency_volatility_values(results, labels, equivalence)
        curves = distance_curves(results, labels, equivalence)
        image = None
        if curves["correct_trajectories"] + curves["incorrect_trajectories"] > 0:
            image = figure_to_array(distance_curve_figure(curves))
        for board in boards:
            for name, series in values.items():
                board.add_histogram(f"diag/{name}", torch.tensor(series), step)
            if image is not None:
                board.add_image("diag/distance_curves", image, step, dataformats="HWC")
