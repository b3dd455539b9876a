"""Command-line checks that run before Hydra composes the config."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from adacov.errors import RunError, UserError


def check_group_choices(argv: Sequence[str], config_dir: Path) -> None:
    """Reject ``group=choice`` overrides (or sweeps ``group=a,b``) that name no file in ``config_dir/group``.

    Hand-written because Hydra reports an unknown choice in a dozen lines of search paths; this
    gives the one-line message the project promises, before anything is composed.
    """
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        group = config_dir / key
        if not sep or "." in key or "/" in key or not group.is_dir() or value in ("null", ""):
            continue
        allowed = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in value.split(","):
            if choice not in allowed:
                raise UserError(f"{key}={choice} is not allowed: use one of {', '.join(allowed)}")


@contextmanager
def exit_on_run_error() -> Iterator[None]:
    """Turn a RunError into one ``error:`` line on stderr and exit with its status, with no traceback."""
    try:
        yield
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_status) from None
