"""Where covo's configs are: `covo/conf` inside an installed wheel, else the checkout's `conf/`
(an editable install, or `src/` on the path). Every entry point composes from `conf_dir()`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def conf_dir() -> Path:
    package = Path(str(files("covo")))
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parents[1] / "conf"
