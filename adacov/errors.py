"""Errors a user can cause; the command line prints them as one line and exits non-zero."""


class UserError(Exception):
    """A bad setting or input, with a message that names the value and what is allowed."""


class DataError(UserError):
    """A dataset that is missing, cannot be downloaded, or fails verification."""
