"""Training items against the evaluation benchmarks: normalised problem texts, hashed.

The benchmarks are those the project ships or reads: every `conf/benchmark/*.yaml`, with
`${benchmark_dir}` in its path standing for `benchmark_dir`; a file missing there is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from covo.data.jsonl import DataError, packaged_path, read_jsonl
from covo.infra.configs import conf_dir

log = logging.getLogger(__name__)
BENCHMARK_CONF = conf_dir() / "benchmark"
_IGNORED = re.compile(r"[\s$]+")


def fingerprint(problem: str) -> str:
    """Hash of the problem with case, Unicode forms, whitespace and `$` signs evened out."""
    text = _IGNORED.sub("", unicodedata.normalize("NFKC", problem).casefold())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def benchmark_files(benchmark_dir: str | Path | None) -> dict[str, tuple[Path, str]]:
    """Benchmark name -> (its file, its problem key), from the benchmark configs (without a
    `benchmark_dir`, only those shipped with the package)."""
    files = {}
    for conf in sorted(BENCHMARK_CONF.glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(conf), resolve=False)
        path = str(node["path"])
        if "${benchmark_dir}" in path:
            if benchmark_dir is None:
                continue
            path = path.replace("${benchmark_dir}", str(benchmark_dir))
        if path.startswith("package:"):
            path = packaged_path(path[len("package:") :])
        files[conf.stem] = (Path(path).expanduser(), node["problem_key"])
    return files


def benchmark_fingerprints(benchmark_dir: str | Path | None) -> dict[str, set[str]]:
    """Fingerprints of every problem of every benchmark whose file exists."""
    prints = {}
    for name, (path, problem_key) in benchmark_files(benchmark_dir).items():
        if path.is_file():
            items = read_jsonl(path, problem_key, answer_key=None)
            prints[name] = {fingerprint(item["problem"]) for item in items}
    return prints


def overlap(problems: list[str], benchmark_dir: str | Path | None) -> dict[str, int]:
    """Per benchmark, how many of `problems` are among its problems (benchmarks without one
    left out)."""
    counts = Counter(fingerprint(p) for p in problems)
    found = {}
    for name, prints in benchmark_fingerprints(benchmark_dir).items():
        shared = sum(n for fp, n in counts.items() if fp in prints)
        if shared:
            found[name] = shared
    return found


def shared_problems(problems: list[str], others: list[str]) -> int:
    """How many of `problems` are also among `others` (as fingerprints: texts evened out)."""
    prints = {fingerprint(p) for p in others}
    return sum(fingerprint(p) in prints for p in problems)


def check_overlap(
    problems: list[str], benchmark_dir: str | Path | None, allowed: bool
) -> dict[str, int]:
    """Log the overlap and raise `DataError` on any, unless `allowed`; returns the counts."""
    found = overlap(problems, benchmark_dir)
    if found:
        shared = ", ".join(f"{n} {name} item{'s' * (n != 1)}" for name, n in found.items())
        message = f"{shared} among the {len(problems)} training items"
        if not allowed:
            raise DataError(
                f"training data holds benchmark items: {message}; "
                "data.allow_benchmark_overlap=true trains on them anyway"
            )
        log.warning("training on benchmark items: %s", message)
    return found
