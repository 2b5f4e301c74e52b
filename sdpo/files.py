"""Output folders that can be written, checked before any work starts."""

from __future__ import annotations

import os
import tempfile

from sdpo.errors import InputError


def check_output_dir(path: str, flag: str) -> None:
    """Create `path` if needed and prove it writable, or stop with one line that names the flag:
    a path that is a file, sits under a file, or is on a read-only file system."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path}: a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
