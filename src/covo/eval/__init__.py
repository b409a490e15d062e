"""Evaluation: greedy pass@1, sampled pass@k and maj@k on math and multiple-choice benchmarks."""

from covo.eval.harness import evaluate

__all__ = ["evaluate"]
