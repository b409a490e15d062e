"""Every generate call samples from the run's own settings, and the sampler's log-probs are the
policy's: nothing inherited from a model's generation_config, fp32 replicas in fp32 under
bf16-mixed autocast, a reused static cache, a loud fallback, statistics chunked over positions."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

from covo.launch.train import train
from covo.models.loading import build_tiny
from covo.rewards.covo.scorer import NaiveScorer, PrefixSharedScorer
from covo.rollout import sampling
from covo.rollout.engine import HFGenerate, generation_config
from covo.rollout.sampler import RolloutSampler
from covo.rollout.sampling import encode_prompts, format_prompts, response_token_stats

PROMPTS = ["What is 12 + 7?", "Add 3 and 4.", "Compute 9 * 9 - 1."]
SUPPRESSED = list(range(100, 200))  # a quarter of the tiny vocabulary


def penalising_defaults(model) -> None:
    """What a shipped generation_config.json may hold (Qwen2.5-Instruct: repetition_penalty),
    pushed until any of it would show."""
    config = model.generation_config
    config.do_sample = True
    config.repetition_penalty = 1.5
    config.no_repeat_ngram_size = 2
    config.top_k = 3
    config.suppress_tokens = SUPPRESSED
    config.min_new_tokens = 12


def plain_logprobs(model, sequences, prompt_len, temperature=1.0) -> torch.Tensor:
    """The oracle: one fp32 forward over prompt + response, log_softmax(logits / T) of each
    sampled token [R, G] (the prompts of `encode_prompts` are left-padded; the responses here
    run to the end without padding)."""
    mask = (sequences != -1).long()
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask).logits.float()
    logp = (logits[:, prompt_len - 1 : -1] / temperature).log_softmax(-1)
    return logp.gather(-1, sequences[:, prompt_len:, None])[..., 0]


def unpadded(tokenizer, prompts):
    """One prompt per call, so no padding enters the oracle's forward."""
    return [encode_prompts(tokenizer, [p], "cpu") for p in prompts]


@pytest.fixture(scope="module")
def penalised():
    loaded = build_tiny(seed=3)
    penalising_defaults(loaded.model)
    loaded.model.eval()
    return loaded


def test_the_config_states_every_processor_and_the_special_tokens(penalised):
    model, tokenizer = penalised.model, penalised.tokenizer
    config = generation_config(model, tokenizer, 8, 4, temperature=0.7, top_p=0.9)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (
        True,
        0.7,
        0.9,
        0,
    )
    assert (config.repetition_penalty, config.no_repeat_ngram_size, config.min_length) == (
        1.0,
        0,
        0,
    )
    assert config.max_new_tokens == 8 and config.num_return_sequences == 4
    assert config.pad_token_id == tokenizer.pad_token_id
    assert config.eos_token_id == [tokenizer.eos_token_id]
    greedy = generation_config(model, tokenizer, 8, temperature=0.0)
    assert greedy.do_sample is False
    # the model's own config is left as it was
    assert model.generation_config.repetition_penalty == 1.5


def test_sampling_takes_nothing_from_the_models_generation_config(penalised):
    model, tokenizer = penalised.model, penalised.tokenizer
    engine, gaps, outside_top3, suppressed, tokens = HFGenerate(), [], 0, 0, 0
    torch.manual_seed(0)
    for encoded in unpadded(tokenizer, PROMPTS):
        out = engine(model, tokenizer, encoded, 4, 10, temperature=1.0, top_p=1.0)
        responses = out.responses
        # a sampled EOS ends a row: compare up to it
        upto = (responses == tokenizer.eos_token_id).long().cumsum(1).roll(1, 1)
        upto[:, 0] = 0
        keep = upto == 0
        oracle = plain_logprobs(model, out.sequences, out.prompt_len)
        gaps.append((out.stats["logprobs"] - oracle).abs()[keep].max())
        with torch.no_grad():
            logits = model(input_ids=out.sequences).logits[:, out.prompt_len - 1 : -1]
        top3 = logits.topk(3, -1).indices
        outside_top3 += int(((top3 != responses[..., None]).all(-1) & keep).sum())
        suppressed += int((torch.isin(responses, torch.tensor(SUPPRESSED)) & keep).sum())
        tokens += int(keep.sum())
    # on the recorded distribution: no repetition penalty, no n-gram ban, no suppression
    assert max(gaps) <= 1e-5
    # sampled outside top-3 and inside the suppressed quarter, as a uniform-ish draw does
    assert outside_top3 > tokens // 2
    assert suppressed > tokens // 10


def test_greedy_decoding_is_the_plain_argmax(penalised):
    model, tokenizer = penalised.model, penalised.tokenizer
    for encoded in unpadded(tokenizer, PROMPTS):
        out = HFGenerate()(model, tokenizer, encoded, 1, 10, 0.0, 1.0, with_stats=False)
        ids = encoded["input_ids"]
        with torch.no_grad():  # the oracle: argmax of a full forward, token by token
            for _ in range(out.responses.shape[1]):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
        assert out.sequences.tolist() == ids.tolist()


def saved_penalised_model(folder) -> str:
    loaded = build_tiny(seed=0)
    penalising_defaults(loaded.model)
    loaded.model.generation_config.min_new_tokens = None  # rows may end early
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def test_training_logs_a_rounding_sized_logprob_gap_in_fp32(tiny_cfg, tmp_path):
    folder = saved_penalised_model(tmp_path / "penalised")
    cfg = tiny_cfg(
        "model=hf",
        f"model.name_or_path={folder}",
        "trainer.precision=32-true",
        "reward=self_certainty",
        "trainer.max_steps=1",
        "callbacks=none",
    )
    out = train(cfg)
    events = EventAccumulator(out["tensorboard_dir"])
    events.Reload()
    gap_max = [e.value for e in events.Scalars("rollout/logprob_gap_max")]
    gap_mean = [e.value for e in events.Scalars("rollout/logprob_gap_mean")]
    assert len(gap_max) == 1
    assert gap_max[0] <= 1e-4 and gap_mean[0] <= 1e-5
    assert [e.value for e in events.Scalars("rollout/engine_fallback")] == [0.0]


def rollout_settings(**changes):
    settings = dict(
        num_samples=2,
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
        one_pass=True,
        stats_chunk=8,
        engine=HFGenerate(),
        dtype=None,
    )
    settings.update(changes)
    return OmegaConf.create(settings, flags={"allow_objects": True})


class NoViews:
    views = {}


@pytest.mark.parametrize("one_pass", [True, False])
def test_an_fp32_rollout_computes_in_fp32_under_bf16_autocast(one_pass):
    loaded = build_tiny(seed=2)
    model, tokenizer = loaded.model, loaded.tokenizer
    sampler = RolloutSampler(tokenizer, True, rollout_settings(one_pass=one_pass))
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's bf16-mixed wraps
        rollout = sampler(model, PROMPTS[:2], NoViews())
    with torch.no_grad():
        oracle = response_token_stats(
            model, rollout.sequences, rollout.attention_mask, rollout.response_mask.shape[1]
        )
    mask = rollout.response_mask.bool()
    for name in ("logprobs", "entropy", "self_certainty"):
        gap = (getattr(rollout, name) - oracle[name]).abs()[mask].max()
        assert gap <= 1e-5, (name, float(gap))


def test_an_fp32_scorer_computes_in_fp32_under_bf16_autocast():
    loaded = build_tiny(seed=2)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    context = tokenizer.encode("What is 12 + 7? We add 12 and 7 to get 19.")
    branches = [[tokenizer.encode(" The answer is 19"), tokenizer.encode(" 18")]]
    args = (context, [len(context)], branches, [[0, 0]])
    plain = NaiveScorer(model, tokenizer).branch_nll(*args)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (None, torch.float32):
            scored = PrefixSharedScorer(model, tokenizer, dtype).branch_nll(*args)[0]
            assert (scored - plain).abs().max() <= 1e-5


def naive_stats(model, sequences, response_len, temperature):
    """The unchunked oracle: the whole [R, G, V] log-softmax at once."""
    with torch.no_grad():
        logits = model(input_ids=sequences).logits[:, -response_len - 1 : -1].float()
    logp = (logits / temperature).log_softmax(-1)
    return {
        "logprobs": logp.gather(-1, sequences[:, -response_len:, None])[..., 0],
        "entropy": -(logp.exp() * logp).sum(-1),
        "self_certainty": -logp.mean(-1) - torch.log(torch.tensor(float(logp.shape[-1]))),
    }


class LargestVocabularyTensor(TorchDispatchMode):
    """Records the most elements of any float tensor an op makes (not a view, such as the
    output head's transposed weight) whose last dim is V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and t.shape[-1:] == (self.vocab,)
            ):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_statistics_pass_is_chunked_over_positions(monkeypatch):
    loaded = build_tiny(seed=4)
    model = loaded.model.eval()
    vocab, rows, prompt, response = model.config.vocab_size, 4, 6, 40
    sequences = torch.randint(0, vocab, (rows, prompt + response), generator=torch.Generator())
    monkeypatch.setattr(sampling, "LOGIT_CHUNK", 32)
    watch = LargestVocabularyTensor(vocab)
    with torch.no_grad(), watch:
        stats = response_token_stats(
            model, sequences, torch.ones_like(sequences), response, temperature=0.7
        )
    oracle = naive_stats(model, sequences, response, 0.7)
    for name in oracle:
        assert (stats[name] - oracle[name]).abs().max() <= 1e-5, name
    # every [.., V] tensor holds at most one chunk of positions, not rows x response of them
    assert watch.largest == 32 * vocab < rows * response * vocab


def test_the_static_cache_is_reused_within_its_bucket(penalised):
    model, tokenizer = penalised.model, penalised.tokenizer
    static, dynamic = HFGenerate("static", length_bucket=64), HFGenerate()
    caches = []
    for prompts in (PROMPTS[:2], PROMPTS[1:]):  # other prompt lengths, the same bucket
        encoded = encode_prompts(tokenizer, format_prompts(tokenizer, prompts, True), "cpu")
        torch.manual_seed(1)
        fast = static(model, tokenizer, encoded, 2, 8, 1.0, 1.0)
        torch.manual_seed(1)
        slow = dynamic(model, tokenizer, encoded, 2, 8, 1.0, 1.0)
        assert fast.sequences.tolist() == slow.sequences.tolist()
        assert (fast.stats["logprobs"] - slow.stats["logprobs"]).abs().max() <= 1e-5
        caches.append(static.static[1])
    assert caches[0] is caches[1]
    encoded = encode_prompts(tokenizer, PROMPTS, "cpu")  # 3 prompts: other rows, a new cache
    static(model, tokenizer, encoded, 2, 8, 1.0, 1.0)
    assert static.static[1] is not caches[0]
    assert static.metrics == {"rollout/engine_fallback": 0.0}


def test_a_kept_cache_survives_the_next_static_call(penalised):
    model, tokenizer = penalised.model, penalised.tokenizer
    engine = HFGenerate("static", length_bucket=64)
    encoded = encode_prompts(tokenizer, PROMPTS[:2], "cpu")
    kept = engine(model, tokenizer, encoded, 2, 8, 1.0, 1.0, keep_cache=True).cache
    before = [layer.keys.clone() for layer in kept.layers]
    engine(model, tokenizer, encoded, 2, 8, 1.0, 1.0)  # reuses (and empties) its own cache
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, kept.layers))
    assert before[0].abs().sum() > 0


def test_a_fallback_warns_once_and_is_logged(penalised, monkeypatch, caplog):
    from torch._dynamo.exc import InternalTorchDynamoError
    from transformers import StaticCache

    def fails(*args, **kwargs):
        raise InternalTorchDynamoError("inductor: no working C++ compiler")

    monkeypatch.setattr(StaticCache, "update", fails)
    model, tokenizer = penalised.model, penalised.tokenizer
    engine, dynamic = HFGenerate("static"), HFGenerate()
    encoded = encode_prompts(tokenizer, PROMPTS[:2], "cpu")
    with caplog.at_level(logging.WARNING, logger="covo.rollout.engine"):
        for _ in range(2):
            torch.manual_seed(5)
            out = engine(model, tokenizer, encoded, 2, 8, 1.0, 1.0)
    torch.manual_seed(5)
    expected = dynamic(model, tokenizer, encoded, 2, 8, 1.0, 1.0)
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert torch.equal(out.stats["logprobs"], expected.stats["logprobs"])
    warnings = [r for r in caplog.records if "engine_fallback" in r.getMessage()]
    assert len(warnings) == 1 and "InternalTorchDynamoError" in warnings[0].getMessage()
    assert engine.metrics == {"rollout/engine_fallback": 1.0}


def test_other_errors_of_the_static_path_are_not_swallowed(penalised, monkeypatch):
    from transformers import StaticCache

    def bug(*args, **kwargs):
        raise ValueError("a shape bug")

    monkeypatch.setattr(StaticCache, "update", bug)
    model, tokenizer = penalised.model, penalised.tokenizer
    engine = HFGenerate("static")
    with pytest.raises(ValueError, match="a shape bug"):
        engine(model, tokenizer, encode_prompts(tokenizer, PROMPTS[:2], "cpu"), 2, 8, 1.0, 1.0)
    assert not engine.fell_back
