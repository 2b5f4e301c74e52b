"""Writing result files so that a reader never sees a half-written one."""

import json
import os


def write_json_atomic(obj, path: str, *, ensure_ascii: bool = False) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place.

    The layout is fixed (indent 2, no trailing newline); `ensure_ascii=True` writes every
    non-ASCII character as a \\uXXXX escape instead of as UTF-8.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=ensure_ascii)
    os.replace(tmp, path)
