"""Writing result files so that a reader never sees a half-written one."""

import json
import os


def write_json_atomic(obj, path: str) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
