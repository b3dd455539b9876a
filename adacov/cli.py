"""Command-line checks that run before Hydra composes the config."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from adacov.errors import DivergenceError, RunError, UserError

log = logging.getLogger(__name__)


def _log_in_run(error: RunError) -> None:
    """Also write ``error`` into the run's own log (train.log), once Hydra has set that up; before, stderr has it."""
    if logging.getLogger().handlers:
        log.error(error)


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


def rank_overrides(environ: Mapping[str, str]) -> list[str]:
    """Hydra overrides for a torchrun rank other than 0, which shares rank 0's run directory.

    Rank 0 alone writes ``.hydra/`` (the composed config) and the job log file there; the other
    ranks would write the same files at the same moment. Their logging goes to stdout instead.
    """
    if int(environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


@contextmanager
def exit_on_run_error() -> Iterator[None]:
    """Turn a RunError into one ``error:`` line on stderr and exit with its status, with no traceback."""
    try:
        yield
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        _log_in_run(error)
        raise SystemExit(error.exit_status) from None


@contextmanager
def divergence_ends_only_this_sweep_job() -> Iterator[None]:
    """In a Hydra multirun, a divergence ends its job (logs kept, one ``error:`` line) and the sweep goes on.

    A learning-rate sweep expects some settings to diverge; that is a result to record, not a reason to
    abandon the other jobs. A single run still exits with the error's status; other errors stop a sweep.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        yield
    except DivergenceError as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        print(f"error: {error}", file=sys.stderr)
        _log_in_run(error)
