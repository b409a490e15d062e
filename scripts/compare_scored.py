"""How many CoVo decisions two `python -m covo.score` outputs of the same input disagree on.

python scripts/compare_scored.py a.jsonl b.jsonl
Per state: is it closer to its own answer (ratio r < 1)? Per trajectory: Con and Vol. Per
cluster: the verdict. Prints the counts and how many differ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(a: list[dict], b: list[dict]) -> dict[str, int]:
    counts = dict.fromkeys(
        ["trajectories", "states", "decisions_flipped", "con_vol_changed", "clusters"], 0
    )
    counts["verdicts_flipped"] = 0
    for rec_a, rec_b in zip(a, b, strict=True):
        if [c["answer"] for c in rec_a["clusters"]] != [c["answer"] for c in rec_b["clusters"]]:
            raise ValueError(f"prompt {rec_a['prompt'][:40]!r}: the two runs cluster differently")
        for x, y in zip(rec_a["responses"], rec_b["responses"], strict=True):
            if x["ratios"] is None:
                continue
            counts["trajectories"] += 1
            counts["states"] += len(x["ratios"])
            counts["decisions_flipped"] += sum(
                (p < 1) != (q < 1) for p, q in zip(x["ratios"], y["ratios"], strict=True)
            )
            counts["con_vol_changed"] += (x["consistency"], x["volatility"]) != (
                y["consistency"],
                y["volatility"],
            )
        for c, d in zip(rec_a["clusters"], rec_b["clusters"]):
            counts["clusters"] += 1
            counts["verdicts_flipped"] += c["verdict"] != d["verdict"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    counts = compare(records(args.a), records(args.b))
    print(
        f"{counts['trajectories']} trajectories, {counts['states']} states: "
        f"{counts['decisions_flipped']} consistency decisions flipped, "
        f"{counts['con_vol_changed']} trajectories with other Con or Vol; "
        f"{counts['verdicts_flipped']} of {counts['clusters']} cluster verdicts flipped"
    )


if __name__ == "__main__":
    main()
