"""The update: accumulated gradients, on-policy ratios, the schedule in optimizer steps."""

from __future__ import annotations

import contextlib
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from test_train import scalars

import covo.algorithms.updater
import covo.module
from covo.algorithms.update import UpdatePlan, plan_epochs
from covo.launch.train import build, train


def test_plan_epochs_cuts_rows_into_steps_and_stops_at_the_budget():
    torch.manual_seed(0)
    rows = torch.tensor([0, 1, 2, 3, 4, 6, 7])
    epochs = plan_epochs(rows, 7, ppo_epochs=2, mini_batch_size=4, micro_batch_size=3, steps_left=9)
    assert [len(e) for e in epochs] == [2, 2]  # ceil(7 / 4) mini-batches per epoch
    for epoch in epochs:
        assert [[len(p) for p in mini] for mini in epoch] == [[3, 1], [3, 0]]
        assert sorted(torch.cat([p for mini in epoch for p in mini]).tolist()) == rows.tolist()
    # a rank with fewer rows runs as many micro-batches, some of them empty
    short = plan_epochs(rows[:2], 7, 1, mini_batch_size=4, micro_batch_size=3, steps_left=9)
    assert [[len(p) for p in mini] for mini in short[0]] == [[2, 0], [0, 0]]
    # three steps left: the second epoch is cut after its first mini-batch
    assert [len(e) for e in plan_epochs(rows, 7, 2, 4, 3, steps_left=3)] == [2, 1]
    assert plan_epochs(rows, 0, 2, 4, 3, steps_left=3) == []


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps, per step, the gradients and the weights they were taken at."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.records = []

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.records.append(
            {
                "grads": [p.grad.detach().clone() for p in params],
                "weights": [p.detach().clone() for p in params],
            }
        )
        return super().step(closure)


def naive_ppo_loss(model, sequences, attention_mask, response_len, old, adv, mask, eps):
    """Token-mean PPO-clip over the rows given, written out without the project's helpers."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=positions
    ).logits
    logits = logits[:, -response_len - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, sequences[:, -response_len:, None])[..., 0]
    ratio = torch.exp(logp - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    return (per_token * mask).sum() / mask.sum()


def assert_naive_ppo_gradient(policy, weights, rollout, rows, old, advantages, recorded):
    """Load `weights` into `policy` and check `recorded` gradients against the naive
    token-mean PPO-clip gradient of `rows`."""
    with torch.no_grad():
        for p, w in zip(policy.parameters(), weights):
            p.copy_(w)
    policy.zero_grad()
    naive_ppo_loss(
        policy,
        rollout.sequences[rows],
        rollout.attention_mask[rows],
        rollout.response_mask.shape[1],
        old[rows],
        advantages[rows],
        rollout.response_mask[rows],
        eps=0.2,
    ).backward()
    for p, grad in zip(policy.parameters(), recorded):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)


def run_recording(tiny_cfg, monkeypatch, *overrides):
    """Fit a tiny run with RecordingSGD; returns the module, its optimizer and, per rollout,
    (rollout, advantages, plan) as the update received them."""
    cfg = tiny_cfg(
        "reward=self_certainty",  # every response its own reward: nothing is filtered
        "callbacks=none",
        "logger=none",
        "export_dir=null",
        "module.max_grad_norm=1.0e9",
        "scheduler=constant",
        "rollout.num_samples=4",
        *overrides,
    )
    module, datamodule, trainer = build(cfg)
    module.optimizer_factory = lambda params: RecordingSGD(params, lr=0.5)
    seen = []
    update = covo.module.SelfRewardRL.update

    def recording_update(self, rollout, advantages, plan):
        seen.append((rollout, advantages.clone(), plan))
        return update(self, rollout, advantages, plan)

    monkeypatch.setattr(covo.module.SelfRewardRL, "update", recording_update)
    initial = [p.detach().clone() for p in module.policy.parameters()]
    trainer.fit(module, datamodule=datamodule)
    return module, trainer.optimizers[0], seen, initial


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.micro_batch_size=3"],  # one optimizer step of 3 micro-batches (8 rows)
        # 2 mini-batches x 2 epochs = 4 steps, micro-batches of 2 inside each
        [
            "algorithm.mini_batch_size=4",
            "algorithm.micro_batch_size=2",
            "algorithm.ppo_epochs=2",
        ],
    ],
)
def test_accumulated_gradients_equal_the_full_batch_token_mean(tiny_cfg, monkeypatch, overrides):
    module, optimizer, seen, initial = run_recording(
        tiny_cfg,
        monkeypatch,
        "trainer.max_steps=1" if len(overrides) == 1 else "trainer.max_steps=4",
        "algorithm.kl_coef=0",
        "trainer.precision=32-true",  # the naive oracle runs in fp32
        *overrides,
    )
    ((rollout, advantages, plan),) = seen
    assert len(optimizer.records) == plan.optimizer_steps
    policy = module.policy
    # old log-probs: the policy before the first step, on the same tokens
    with torch.no_grad():
        for p, w in zip(policy.parameters(), initial):
            p.copy_(w)
        old = torch.stack([-naive_token_nll(policy, rollout, r) for r in range(len(advantages))])
    minis = [mini for epoch in plan.epochs for mini in epoch]
    for record, mini in zip(optimizer.records, minis):
        assert_naive_ppo_gradient(
            policy, record["weights"], rollout, torch.cat(mini), old, advantages, record["grads"]
        )
    assert any(g.abs().max() > 1e-4 for g in optimizer.records[0]["grads"])


def test_held_forward_gives_the_same_step_with_one_forward_fewer(tiny_cfg, monkeypatch):
    """KL in the reward, one optimizer step: with `hold_graphs` the step's own forward gives
    the old log-probs. The gradients equal the naive full-batch PPO gradient and those of the
    separate no-grad pass; the policy runs 3 forwards (one per micro-batch) instead of 6."""
    runs = {}
    for hold in ("true", "false"):
        with monkeypatch.context() as patch:
            module, optimizer, seen, initial = run_recording(
                tiny_cfg,
                patch,
                "trainer.max_steps=1",
                "algorithm=reinforce_pp",
                "algorithm.kl_coef=0.01",
                "algorithm.micro_batch_size=3",  # 8 rows: micro-batches of 3, 3 and 2
                f"model.hold_graphs={hold}",
                "trainer.precision=32-true",
            )
        runs[hold] = (module, optimizer, seen, initial)
    for hold, run in runs.items():
        ((_, _, plan),) = run[2]
        assert (plan.held is not None) == (hold == "true")
    # the same rollout, advantages and gradients either way
    (held_rollout, held_adv, held_plan) = runs["true"][2][0]
    (pass_rollout, pass_adv, pass_plan) = runs["false"][2][0]
    assert torch.equal(held_rollout.sequences, pass_rollout.sequences)
    torch.testing.assert_close(held_plan.old_logprobs, pass_plan.old_logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(held_adv, pass_adv, rtol=0, atol=1e-6)
    for a, b in zip(runs["true"][1].records[0]["grads"], runs["false"][1].records[0]["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # against the naive oracle
    module, optimizer, _, initial = runs["true"]
    policy = module.policy
    with torch.no_grad():
        for p, w in zip(policy.parameters(), initial):
            p.copy_(w)
        old = torch.stack([-naive_token_nll(policy, held_rollout, r) for r in range(len(held_adv))])
    rows = torch.cat(held_plan.epochs[0][0])
    recorded = optimizer.records[0]["grads"]
    assert_naive_ppo_gradient(policy, initial, held_rollout, rows, old, held_adv, recorded)
    assert any(g.abs().max() > 1e-4 for g in optimizer.records[0]["grads"])


def test_held_forward_saves_one_policy_forward_per_micro_batch(tiny_cfg, monkeypatch):
    counts = {}
    token_logprobs = covo.algorithms.updater.Updater.token_logprobs
    for hold in ("true", "false"):
        calls = []

        def counting(self, model, *args, calls=calls, original=token_logprobs, **kwargs):
            calls.append(model is self.policy)
            return original(self, model, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(covo.algorithms.updater.Updater, "token_logprobs", counting)
            run_recording(
                tiny_cfg,
                patch,
                "trainer.max_steps=1",
                "algorithm=reinforce_pp",
                "algorithm.micro_batch_size=3",
                f"model.hold_graphs={hold}",
            )
        counts[hold] = (sum(calls), len(calls) - sum(calls))  # (policy, reference) forwards
    assert counts == {"true": (3, 3), "false": (6, 3)}


def naive_token_nll(policy, rollout, r):
    """Per-token NLL [G] of row r's sampled tokens, from an unpadded forward."""
    response_len = rollout.response_mask.shape[1]
    keep = rollout.attention_mask[r].bool()
    ids = rollout.sequences[r][keep][None]
    logits = policy(input_ids=ids).logits[0].float()
    n = int(rollout.response_mask[r].sum())
    targets = ids[0, -n:] if n else ids[0, :0]
    nll = -torch.log_softmax(logits[-n - 1 : -1], -1).gather(-1, targets[:, None])[:, 0]
    out = torch.zeros(response_len)
    out[:n] = nll
    return out


def test_on_policy_ratio_is_exactly_one_in_the_first_epoch(tiny_cfg, monkeypatch):
    """A bf16 rollout replica against an fp32 policy under bf16 autocast: old log-probs come
    from the training path, so the first epoch's ratios are exactly 1."""
    calls = []
    policy_loss = covo.algorithms.updater.policy_loss

    def recording(*args, **kwargs):
        loss, stats = policy_loss(*args, **kwargs)
        calls.append({k: float(v) for k, v in stats.items()})
        return loss, stats

    monkeypatch.setattr(covo.algorithms.updater, "policy_loss", recording)
    module, optimizer, seen, _ = run_recording(
        tiny_cfg,
        monkeypatch,
        "rollout.dtype=bfloat16",
        "trainer.precision=bf16-mixed",
        "algorithm.ppo_epochs=2",
        "algorithm.micro_batch_size=4",
        "trainer.max_steps=4",
    )
    assert next(module.policy.parameters()).dtype == torch.float32  # master weights
    assert module.sampler.view.replica is not None
    per_epoch = 2  # 8 rows in micro-batches of 4
    for step in range(len(seen)):
        first = calls[step * 2 * per_epoch : step * 2 * per_epoch + per_epoch]
        second = calls[step * 2 * per_epoch + per_epoch : (step + 1) * 2 * per_epoch]
        assert all(c["approx_kl"] == 0.0 and c["ratio_mean"] == 1.0 for c in first)
        assert all(c["clip_frac"] == 0.0 for c in first)
        # after the first optimizer step the policy has moved: the ratio is no longer 1
        assert any(c["approx_kl"] != 0.0 for c in second)
    # the bf16 replica's own log-probs (kept for rewards and logs) differ from the training path
    rollout, _, plan = seen[0]
    kept = plan.keep[:, None] * rollout.response_mask
    assert ((rollout.logprobs - plan.old_logprobs).abs() * kept).max() > 1e-4


def test_kl_to_the_reference_starts_at_exactly_zero(tiny_cfg):
    """The reference keeps the policy's master dtype and runs the same path: the first
    rollout's KL is exactly 0 (same weights), the third one's is not."""
    cfg = tiny_cfg(
        "reward=self_certainty",
        "callbacks=none",
        "export_dir=null",
        "trainer.max_steps=3",
        "optimizer.lr=1e-3",
        "rollout.dtype=bfloat16",
        "trainer.precision=bf16-mixed",
    )
    out = train(cfg)
    values = scalars(out["tensorboard_dir"])
    assert values["train/kl"][0] == 0.0
    assert values["train/kl"][2] != 0.0
    assert values["train/approx_kl"] == [0.0, 0.0, 0.0]
    assert values["train/clip_frac"] == [0.0, 0.0, 0.0]
    assert values["train/ratio_mean"] == [1.0, 1.0, 1.0]


def test_schedule_spans_the_run_in_optimizer_steps(tiny_cfg):
    """4 optimizer steps per rollout (2 mini-batches x 2 epochs): 16 steps are 4 rollouts,
    warm-up and cosine are counted in steps, and the last step runs at the minimum lr."""
    cfg = tiny_cfg(
        "reward=self_certainty",
        "callbacks=none",
        "export_dir=null",
        "rollout.num_samples=4",
        "algorithm.mini_batch_size=4",
        "algorithm.ppo_epochs=2",
        "trainer.max_steps=16",
        "scheduler.warmup_ratio=0.1",
        "scheduler.min_lr_ratio=0.1",
        "optimizer.lr=1e-3",
    )
    out = train(cfg)
    values = scalars(out["tensorboard_dir"])
    # warm-up ceil(1.6) = 2 steps; the lr logged is that of each rollout's last step (3, 7, ..)
    # cosine from step 2 (peak) to step 15 (min): 0.1 + 0.9 * (1 + cos(pi * (t - 2) / 13)) / 2
    expected = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * (t - 2) / 13))) for t in (3, 7, 11)]
    assert values["train/optimizer_steps"] == [4.0, 4.0, 4.0, 4.0]
    assert values["train/lr"][:3] == pytest.approx(expected, rel=1e-5)
    assert values["train/lr"][3] == pytest.approx(1e-4, rel=1e-5)


def test_a_rollout_with_every_group_filtered_makes_no_step(tiny_cfg):
    # the random tiny model never answers right: ground truth gives 0 everywhere
    cfg = tiny_cfg(
        "reward=ground_truth",
        "callbacks=none",
        "logger=none",
        "export_dir=null",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
    )
    module, datamodule, trainer = build(cfg)
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer.fit(module, datamodule=datamodule)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    assert trainer.global_step == 0
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 0
    assert all(torch.equal(p, b) for p, b in zip(module.policy.parameters(), before))


def test_a_run_whose_rollouts_never_step_stops_after_the_idle_bound(tiny_cfg, caplog):
    cfg = tiny_cfg(
        "reward=ground_truth",  # 0 everywhere on the tiny model: every group is filtered
        "callbacks=none",
        "logger=none",
        "export_dir=null",
        "trainer.max_steps=5",
        "algorithm.max_idle_rollouts=3",
    )
    module, datamodule, trainer = build(cfg)
    with caplog.at_level(logging.WARNING, logger="covo.module"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3
    assert trainer.global_step == 0
    [line] = [r.getMessage() for r in caplog.records if "no optimizer step" in r.getMessage()]
    assert line.startswith("stopping at step 0 of 5: 3 rollouts in a row")


def test_cosine_lr_at_every_optimizer_step():
    from covo.optim import cosine_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = cosine_with_warmup(opt, total_steps=8, warmup_ratio=0.25, min_lr_ratio=0.25)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    # warm-up of 2 steps: lr 2 x (t + 1) / 3; the peak at step 2; then a cosine over 5 steps
    # down to 0.25 x 2 at step 7: 0.5 + 0.75 (1 + cos(k pi / 5)), with cos(pi / 5) =
    # (1 + sqrt 5) / 4 and cos(2 pi / 5) = (sqrt 5 - 1) / 4
    c1, c2 = (1 + math.sqrt(5)) / 4, (math.sqrt(5) - 1) / 4
    hand = [2 / 3, 4 / 3, 2.0]
    hand += [0.5 + 0.75 * (1 + c) for c in (c1, c2, -c2, -c1)] + [0.5]
    assert seen == pytest.approx(hand, rel=1e-9)


def test_held_forwards_share_one_cast_of_each_weight_under_autocast():
    """Lightning's autocast caches no casts: each held graph would keep a bf16 copy of every
    weight. Inside shared_weight_casts two forwards keep one copy, compute the same numbers,
    and a weight changed after the block is cast anew."""
    from covo.algorithms.updater import shared_weight_casts
    from covo.models.loading import build_tiny

    model = build_tiny(seed=0).model
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 250, 31, 64, 12, 9]])

    def two_forwards(shared: bool):
        casts, saved = set(), []

        def pack(t):
            if t.dtype == torch.bfloat16 and tuple(t.shape) in weights:
                casts.add(t.untyped_storage().data_ptr())
            saved.append(t)
            return t

        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            block = shared_weight_casts("cpu") if shared else contextlib.nullcontext()
            with block, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                losses = [model(input_ids=ids[i : i + 1]).logits.float().sum() for i in (0, 1)]
        for loss in losses:  # one backward per micro-batch, as the update runs them
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return len(casts), [float(x) for x in losses], grads

    apart, losses_apart, grads_apart = two_forwards(shared=False)
    shared, losses_shared, grads_shared = two_forwards(shared=True)
    # 2 layers x 7 projections (q, k, v, o, gate, up, down): one bf16 copy each per forward
    # apart, one each for both forwards shared
    assert (apart, shared) == (28, 14)
    assert losses_shared == losses_apart
    for a, b in zip(grads_apart, grads_shared, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # leaving the block clears the cache: a changed weight is cast anew
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    _, losses_after, _ = two_forwards(shared=True)
    assert losses_after != losses_shared


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_mask_truncated_takes_cut_responses_out_of_the_loss(tiny_cfg, mask_truncated):
    cfg = tiny_cfg(
        f"algorithm.mask_truncated={str(mask_truncated).lower()}",
        "algorithm.kl_coef=0",
        "callbacks=none",
        "logger=none",
    )
    module, _, _ = build(cfg)
    # row 0 stopped with an EOS, row 1 was cut at max_new_tokens; both 3 tokens, advantage 1
    rollout = SimpleNamespace(
        response_mask=torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
        truncated=torch.tensor([False, True]),
    )
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    mask = module.updater.loss_mask(rollout)
    plan = UpdatePlan(keep=torch.ones(2, dtype=torch.bool))
    normalizer = float(mask.sum())  # reinforce_pp: a token mean
    loss, _, tokens = module.updater.micro_batch_loss(
        rollout, mask, torch.ones(2, 3), torch.arange(2), normalizer, plan, logprobs
    )
    loss.backward()
    # the gradient of -A * ratio at ratio 1 is -1 / (tokens in the loss) per token
    cut = [0.0] * 3 if mask_truncated else [-1 / 6] * 3
    stopped = [-1 / 3] * 3 if mask_truncated else [-1 / 6] * 3
    torch.testing.assert_close(logprobs.grad, torch.tensor([stopped, cut]))
    assert tokens == (3.0 if mask_truncated else 6.0)
