"""A mistake in the settings or the files ends a run with one line that names it, and exit 2;
anything else is a bug: it keeps its traceback, which also goes into the run's log file."""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys

from hydra.errors import InstantiationException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

log = logging.getLogger(__name__)


class UserError(Exception):
    """A bad setting, a bad or missing file, a missing extra: the user's to fix."""


class SettingError(UserError, ValueError):
    """A config value out of its range, or settings that contradict each other."""


class DataError(UserError, ValueError):
    """A file the run reads is missing or malformed."""


def root_cause(err: BaseException) -> BaseException:
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def is_user_error(err: BaseException) -> bool:
    """The project's own error types; the config's errors (a `???` left unset, an interpolation
    that does not resolve; not code reading a key its YAML lacks); and a constructor's
    ValueError or FileNotFoundError while Hydra instantiates a config (a knob it refuses)."""
    cause = root_cause(err)
    if isinstance(cause, UserError):
        return True
    if isinstance(cause, OmegaConfBaseException):
        return not isinstance(cause, ConfigKeyError | ConfigAttributeError)
    return isinstance(err, InstantiationException) and isinstance(
        cause, ValueError | FileNotFoundError
    )


def one_line(err: BaseException) -> str:
    cause = root_cause(err)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"error: {text}"


def log_to_run_files(err: BaseException) -> None:
    """The traceback into the log files of the run (Hydra's `<task>.log` in the run directory);
    the console shows it as the exception leaves."""
    record = log.makeRecord(
        log.name,
        logging.ERROR,
        __file__,
        0,
        "the run failed",
        (),
        (type(err), err, err.__traceback__),
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_on_user_error(main):
    """Wrap an entry point: a user error prints one line and exits 2; any other exception
    propagates with its traceback, after writing it to the run's log files."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            if not is_user_error(err):
                log_to_run_files(err)
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


def exit_on_renamed_key(argv: list[str], renamed: dict[str, str]) -> None:
    """An override of a key that moved (`renamed`: old -> new): one line naming the new key,
    exit 2, where Hydra would only say the old key is not in the config."""
    for arg in argv:
        override = arg.lstrip("+~")  # the new key exists: no appending or deleting
        key = override.split("=", 1)[0]
        if key in renamed:
            print(
                f"error: {key} is now {renamed[key]}: {arg} -> {renamed[key]}{override[len(key) :]}"
                " (docs/configuration.md: Renamed keys)",
                file=sys.stderr,
            )
            sys.exit(2)
