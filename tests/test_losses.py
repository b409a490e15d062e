from __future__ import annotations

import math

import pytest
import torch

from covo.algorithms.losses import (
    kl_estimate,
    kl_loss,
    loss_count,
    loss_weights,
    masked_mean,
    policy_loss,
)

torch.set_num_threads(1)

# d = logp - logp_ref = [1, -1, 0]
LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-2.0, -1.0, -0.5]])
E = math.e


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("k1", [1.0, -1.0, 0.0]),
        ("k2", [0.5, 0.5, 0.0]),  # d^2 / 2
        ("k3", [1 / E + 1 - 1, E - 1 - 1, 0.0]),  # exp(-d) + d - 1
    ],
)
def test_kl_estimates_hand_values(estimator, expected):
    torch.testing.assert_close(kl_estimate(LOGP, REF, estimator), torch.tensor([expected]))


def test_k3_is_never_negative_and_k1_k3_are_unbiased():
    pi = torch.tensor([0.5, 0.25, 0.25])
    ref = torch.tensor([0.25, 0.25, 0.5])
    # KL(pi || ref) = 0.5 ln 2 + 0.25 ln 1 + 0.25 ln 0.5 = 0.25 ln 2
    true_kl = 0.25 * math.log(2)
    for name in ("k1", "k3"):
        per_outcome = kl_estimate(pi.log(), ref.log(), name)
        torch.testing.assert_close((pi * per_outcome).sum(), torch.tensor(true_kl))
    d = torch.linspace(-5, 5, 101)
    assert (kl_estimate(d, torch.zeros(101), "k3") >= 0).all()


def test_unknown_kl_estimator_names_the_options():
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(LOGP, REF, "k4")


def test_kl_loss_reductions():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(kl_loss(LOGP, REF, mask, "k1"), torch.tensor(0.0))  # (1 - 1) / 2
    torch.testing.assert_close(kl_loss(LOGP, REF, mask, "k2"), torch.tensor(0.5))
    # with a batch-wide normalizer of 4 tokens: (1/e + e - 2) / 4
    expected = torch.tensor((1 / E + E - 2) / 4)
    torch.testing.assert_close(kl_loss(LOGP, REF, mask, "k3", normalizer=4), expected)


def test_masked_mean_per_row_and_empty_row():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 6.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(2.0))


def test_policy_loss_clips_both_signs_and_blocks_their_gradient():
    ratios = torch.tensor([[1.5, 1.1, 0.5, 0.9, 0.5, 1.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    logprobs = ratios.log().requires_grad_()
    loss, stats = policy_loss(logprobs, torch.zeros(1, 7), advantages, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    # A=+1 r=1.5 -> max(-1.5, -1.2) = -1.2 clipped | A=+1 r=1.1 -> -1.1
    # A=-1 r=0.5 -> max(0.5, 0.8) = 0.8 clipped    | A=-1 r=0.9 -> 0.9
    # A=+1 r=0.5 -> max(-0.5, -0.8) = -0.5 (pessimistic, not clipped)
    # A=-1 r=1.5 -> max(1.5, 1.2) = 1.5 (not clipped); padding ignored
    # mean = (-1.2 - 1.1 + 0.8 + 0.9 - 0.5 + 1.5) / 6 = 0.4 / 6
    torch.testing.assert_close(loss, torch.tensor(0.4 / 6))
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens, 0 on clipped ones and padding
    expected_grad = torch.tensor([[0.0, -1.1, 0.0, 0.9, -0.5, 1.5, 0.0]]) / 6
    torch.testing.assert_close(logprobs.grad, expected_grad)
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(2 / 6))
    # (1.5 + 1.1 + 0.5 + 0.9 + 0.5 + 1.5) / 6 = 1
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))
    approx_kl = -math.log(1.5 * 1.1 * 0.5 * 0.9 * 0.5 * 1.5) / 6
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(approx_kl))
    assert not any(v.requires_grad for v in stats.values())


def test_micro_batch_losses_with_normalizer_sum_to_the_batch_mean():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 5, generator=generator)
    old = logprobs + 0.3 * torch.randn(4, 5, generator=generator)
    advantages = torch.randn(4, 5, generator=generator)
    # rows with 5, 1, 3 and 2 real tokens: micro-batch means would weight tokens unequally
    mask = (torch.arange(5) < torch.tensor([5, 1, 3, 2])[:, None]).float()
    full, _ = policy_loss(logprobs, old, advantages, mask, 0.2)
    normalizer = mask.sum()
    parts = [
        policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], 0.2, normalizer)[0]
        for rows in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(parts[0] + parts[1], full)
    means = [
        policy_loss(logprobs[r], old[r], advantages[r], mask[r], 0.2)[0]
        for r in (slice(0, 2), slice(2, 4))
    ]
    assert not torch.isclose((means[0] + means[1]) / 2, full)


def _grad(theta, f):
    (g,) = torch.autograd.grad(f(), theta)
    return g


@pytest.mark.parametrize(
    ("estimator", "in_loss", "in_reward"),
    [
        ("k1", "zero", "reverse"),
        ("k2", "reverse", "mean_half_d2 - reverse"),
        ("k3", "forward", "reverse - forward"),
    ],
)
def test_kl_estimator_gradients_follow_the_readme_table(estimator, in_loss, in_reward):
    """Exact expectations over a 6-way categorical policy at pi_old = pi: the gradient each
    estimator gives in the loss (differentiated through logp) and in the reward (as a
    REINFORCE penalty), against autograd of the closed-form divergences."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.softmax(torch.randn(6, dtype=torch.float64), 0).log()

    def logpi():
        return torch.log_softmax(theta, 0)

    pi = logpi().exp().detach()
    targets = {
        "zero": torch.zeros(6, dtype=torch.float64),
        "reverse": _grad(theta, lambda: (logpi().exp() * (logpi() - ref)).sum()),
        "forward": _grad(theta, lambda: (ref.exp() * (ref - logpi())).sum()),
        "mean_half_d2": _grad(theta, lambda: (logpi().exp() * 0.5 * (logpi() - ref) ** 2).sum()),
    }
    targets["mean_half_d2 - reverse"] = targets["mean_half_d2"] - targets["reverse"]
    targets["reverse - forward"] = targets["reverse"] - targets["forward"]
    as_loss = _grad(theta, lambda: (pi * kl_estimate(logpi(), ref, estimator)).sum())
    as_reward = _grad(
        theta, lambda: (pi * kl_estimate(logpi(), ref, estimator).detach() * logpi()).sum()
    )
    torch.testing.assert_close(as_loss, targets[in_loss])
    torch.testing.assert_close(as_reward, targets[in_reward])
    assert targets["reverse"].abs().max() > 0.01 and targets["forward"].abs().max() > 0.01


def test_k3_stays_finite_on_padding_with_minus_infinite_logprobs():
    logp = torch.tensor([[-1.0, float("-inf")]])
    ref = torch.tensor([[-2.0, -0.5]])
    mask = torch.tensor([[1.0, 0.0]])
    # d = 1 on the real token; the padded d = -inf is clamped to -10 and masked out
    torch.testing.assert_close(kl_loss(logp, ref, mask, "k3"), torch.tensor(1 / E + 1 - 1))
    # a real token beyond the clamp: d = 30 counts as d = 10
    far = kl_estimate(torch.tensor([0.0]), torch.tensor([-30.0]), "k3")
    torch.testing.assert_close(far, torch.tensor([math.exp(-10) + 10 - 1]))


# row 0: A = 1 on 2 tokens (its third is padding); row 1: A = 2 on 3 tokens. At ratio 1 the
# per-token loss is -A and its gradient d/dlogp is -A, times each token's aggregate weight
AGG_ADV = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    ("loss_agg", "value", "grad_rows"),
    [
        # (-1 - 1 - 2 - 2 - 2) / 5 tokens
        ("token_mean", -8 / 5, [-1 / 5, -2 / 5]),
        # (mean(-1, -1) + mean(-2, -2, -2)) / 2 sequences
        ("seq_mean_token_mean", -1.5, [-1 / (2 * 2), -2 / (3 * 2)]),
        # (sum(-1, -1) / 4 + sum(-2, -2, -2) / 4) / 2 sequences, L = max_new_tokens = 4
        ("seq_mean_token_sum_norm", -1.0, [-1 / (4 * 2), -2 / (4 * 2)]),
    ],
)
def test_loss_aggregations_hand_values_and_gradients(loss_agg, value, grad_rows):
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    weights = loss_weights(AGG_MASK, loss_agg, max_len=4)
    n = loss_count(AGG_MASK, loss_agg)
    loss, _ = policy_loss(logprobs, logprobs.detach(), AGG_ADV, AGG_MASK, 0.2, n, weights)
    torch.testing.assert_close(loss, torch.tensor(value))
    loss.backward()
    expected = torch.tensor(grad_rows)[:, None] * AGG_MASK
    torch.testing.assert_close(logprobs.grad, expected)


def naive_aggregate(per_token, mask, loss_agg, max_len):
    """The aggregates written out row by row, over the whole batch at once."""
    rows = [
        [per_token[i, t] for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])
    ]
    rows = [r for r in rows if r]  # sequences with tokens in the loss
    if loss_agg == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if loss_agg == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) / max_len for r in rows) / len(rows)


@pytest.mark.parametrize(
    "loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
)
def test_micro_batch_aggregates_sum_to_the_full_batch_one(loss_agg):
    g = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(5, 6, generator=g) - 0.1).requires_grad_()
    old = logprobs.detach() + 0.05 * torch.randn(5, 6, generator=g)
    advantages = torch.randn(5, 1, generator=g).expand(5, 6)
    lengths = [6, 2, 0, 4, 1]  # row 2: nothing in the loss (a truncated row under the mask)
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).float()
    ratio = (logprobs - old).exp()
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    want = naive_aggregate(per_token, mask, loss_agg, max_len=6)
    n = loss_count(mask, loss_agg)
    total = sum(
        policy_loss(
            logprobs[rows],
            old[rows],
            advantages[rows],
            mask[rows],
            0.2,
            n,
            loss_weights(mask[rows], loss_agg, 6),
        )[0]
        for rows in (slice(0, 2), slice(2, 5))
    )
    torch.testing.assert_close(total, want)
    (grad,) = torch.autograd.grad(total, logprobs)
    (want_grad,) = torch.autograd.grad(want, logprobs)
    torch.testing.assert_close(grad, want_grad)
    assert grad[2].abs().sum() == 0 and grad[0].abs().sum() > 0
