"""`python -m covo <command> [overrides]`: the `covo` console script."""

from covo.cli import main

main()
