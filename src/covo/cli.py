"""`covo <command> [overrides]`: one console script for covo's commands. Each command reads
the rest of the line as its module would (`covo train reward=majority` is
`python train.py reward=majority`; `covo report --compare a b` is `python -m covo.report ...`)."""

from __future__ import annotations

import importlib
import sys

# command -> (the module whose `main` runs it, what it does)
COMMANDS = {
    "train": ("covo.launch.train", "train a policy (Hydra overrides of conf/train.yaml)"),
    "eval": ("covo.launch.eval", "evaluate a policy on benchmarks (conf/eval.yaml)"),
    "score": ("covo.analysis.score", "score saved responses with rewards (conf/score.yaml)"),
    "study": ("covo.analysis.study", "sample once, score with many rewards (conf/study.yaml)"),
    "outcomes": ("covo.analysis.outcomes", "train each reward on several seeds, compare outcomes"),
    "report": ("covo.analysis.report", "tables from finished runs (--compare: two sweeps)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: covo <command> [args]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"error: covo {command}: no such command (one of {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.argv = [f"covo {command}", *rest]
    importlib.import_module(COMMANDS[command][0]).main()
