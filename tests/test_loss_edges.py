"""Masked means and the KL loss at their edges, with hand-computed numbers: a mean along one
axis, a single token, the values' dtype, and the KL loss under per-sequence weights."""

from __future__ import annotations

import torch

from covo.algorithms.losses import kl_loss, loss_weights, masked_mean

torch.set_num_threads(1)

# two responses of 3 and 2 tokens
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_masked_mean_along_one_axis_and_of_one_token():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    # per row: (1 + 2 + 3) / 3 and (4 + 5) / 2; the padding's 100 never counts
    torch.testing.assert_close(masked_mean(x, MASK, dim=1), torch.tensor([2.0, 4.5]))
    # per column: (1 + 4) / 2, (2 + 5) / 2, 3 / 1
    torch.testing.assert_close(masked_mean(x, MASK, dim=0), torch.tensor([2.5, 3.5, 3.0]))
    torch.testing.assert_close(
        masked_mean(torch.tensor([[4.0]]), torch.ones(1, 1)), torch.tensor(4.0)
    )


def test_masked_mean_keeps_the_values_dtype():
    assert masked_mean(torch.ones(2, 3, dtype=torch.bfloat16), MASK).dtype == torch.bfloat16


def test_kl_loss_follows_the_sequence_weights():
    # k1 = logp - logp_ref: [1, 2, 3] and [4, 5]; seq_mean_token_mean over 2 sequences:
    # ((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2 = 3.25 (the token mean would be 15 / 5 = 3)
    ref = -torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    weights = loss_weights(MASK, "seq_mean_token_mean", 3)
    loss = kl_loss(torch.zeros(2, 3), ref, MASK, "k1", normalizer=2.0, weights=weights)
    torch.testing.assert_close(loss, torch.tensor(3.25))
