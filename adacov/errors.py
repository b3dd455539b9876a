"""Errors that end a run with one line on stderr and a non-zero exit status, never a traceback."""


class RunError(Exception):
    """A run cannot go on; the message says why and what to do. ``exit_status`` is the process's."""

    exit_status = 1


class UserError(RunError):
    """A bad setting or input, with a message that names the value and what is allowed."""

    exit_status = 2


class DataError(UserError):
    """A dataset that is missing, cannot be downloaded, or fails verification."""


class DivergenceError(RunError):
    """The run diverged; everything logged before it is kept. A sweep records it and goes on."""


class NonFiniteLossError(DivergenceError):
    """The training loss became NaN or infinite."""


class OptimizerFailedError(DivergenceError):
    """The optimizer's step failed to decompose its curvature, which non-finite statistics cause."""


class TrainingInterrupted(RunError):
    """SIGTERM or SIGINT arrived; a checkpoint was written. Exits ``128 + signal`` as the shell does."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum
