"""The project's downloader: fetch a file, check it, and only then put it where later runs look."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from adacov.errors import DataError

# What is wrong with a file, as the end of a sentence that starts with its name ("is truncated"), or None.
Check = Callable[[Path], "str | None"]


def fetch(url: str, dest: Path, check: Check, hint: str) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``, renamed only once ``check`` finds nothing wrong.

    On any failure the partial file is removed, so nothing is left in ``dest``'s folder that a later
    run would trust, and a :class:`DataError` ends with ``hint``: what the user can do instead.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as error:
            raise DataError(f"could not download {url} ({error}): {hint}") from error
        problem = check(partial)
        if problem is not None:
            raise DataError(f"the file downloaded from {url} {problem}; nothing was kept: {hint}")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(dest)


def md5_hex(data: bytes | Path) -> str:
    """The md5 of ``data``, or of a file's content read in chunks."""
    if isinstance(data, bytes):
        return hashlib.md5(data).hexdigest()
    digest = hashlib.md5()
    with open(data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5_check(md5: str) -> Check:
    """A :data:`Check` that a file's md5 is ``md5``."""

    def check(path: Path) -> str | None:
        found = md5_hex(path)
        return None if found == md5 else f"is corrupt: md5 {found}, expected {md5}"

    return check
