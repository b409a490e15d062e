"""Bad input ends a run with one line that names the problem, and a non-zero exit code."""

from __future__ import annotations

import functools
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
