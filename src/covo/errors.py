"""Bad input ends a run with one line that names the problem, and a non-zero exit code."""

from __future__ import annotations

import functools
import importlib.util
import sys

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

from covo.data.jsonl import DataError
from covo.lora import MissingExtraError
from covo.model import ModelLoadError

USER_ERRORS = (
    DataError,
    ModelLoadError,
    MissingExtraError,
    ValueError,
    FileNotFoundError,
    KeyError,
)


def root_cause(err: BaseException) -> BaseException:
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
    cause = root_cause(err)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"error: {text}"


def exit_on_user_error(main):
    """Wrap an entry point: configuration and input errors print one line and exit 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (InstantiationException, OmegaConfBaseException, *USER_ERRORS) as err:
            cause = root_cause(err)
            if not isinstance(cause, (OmegaConfBaseException, *USER_ERRORS)):
                raise
            print(one_line(err), file=sys.stderr)
            sys.exit(2)

    return wrapped


# Hydra plugins (launchers, sweepers) that an extra installs: an override, or the start of
# one (every `hparams_search=` option runs the Optuna sweeper) -> (the plugin's module, the extra)
LAUNCHER_EXTRAS = {
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


def exit_on_missing_launcher(argv: list[str]) -> None:
    """A launcher or sweeper whose extra is not installed: one line naming the extra, exit 2.
    (Hydra resolves them before any run code, and would only name a config it cannot find.)"""
    for arg in argv:
        module, extra = next(
            (plugin for start, plugin in LAUNCHER_EXTRAS.items() if arg.startswith(start)),
            (None, None),
        )
        if module is not None and not installed(module):
            print(
                f"error: {arg} needs the `{extra}` extra: pip install -e '.[{extra}]'"
                f" (or `bash scripts/setup.sh {extra}`)",
                file=sys.stderr,
            )
            sys.exit(2)
