"""Files: output folders checked before any work, result files that a reader never sees
half-written, and cheap fingerprints that tell files apart.

Every result is written under a temporary name beside its final path, `<path>.tmp<pid>`, then
renamed into place. The temporary name never ends in the final suffix (`x.png.tmp123`, not
`x.tmp123.png`), so a kill between the two leaves nothing that `*.png` or `*.json` matches, and
`remove_stale_temps` removes what such a kill left when a folder is used again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from sdpo.errors import InputError, first_line

TEMP_NAME = re.compile(r"\.tmp(\d+)(\.png)?$")  # ours; `.tmpNNN.png` is what earlier versions wrote


def check_output_dir(path: str, flag: str, create: bool = True) -> str:
    """Make the folder `path` (and its parents) and prove it writable by writing and removing a
    probe file: a path that is a file, lies under a file, or is read-only fails here, before
    anything is loaded. With create=False nothing is written: the folder, or the nearest folder
    that exists above it, must be a writable folder. Returns the path."""
    if not path:
        raise InputError(f"{flag}: an empty path (name a folder)")
    if not create:
        _check_could_create(path, flag)
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{flag} {path}: a file is in the way (a folder is needed)") from None
    except NotADirectoryError:
        raise InputError(f"{flag} {path}: lies under a file, not a folder") from None
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot create the folder ({err.strerror or first_line(err)})") from None
    probe = os.path.join(path, f".write-probe.tmp{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("probe")
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot write there ({err.strerror or first_line(err)})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return path


def _check_could_create(path: str, flag: str) -> None:
    """check_output_dir's findings without writing: a folder that exists, or one whose nearest
    existing ancestor is a folder this process may write in."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path}: a file is in the way (a folder is needed)")
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise InputError(f"{flag} {path}: lies under a file, not a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write there ({here} is not writable)")


def temp_path(path: str) -> str:
    """The temporary name of `path` for this process."""
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(obj, path: str, *, ensure_ascii: bool = False) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place.

    The layout is fixed (indent 2, no trailing newline); `ensure_ascii=True` writes every
    non-ASCII character as a \\uXXXX escape instead of as UTF-8.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=ensure_ascii)


def write_text_atomic(text: str, path: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():  # a temporary file of ours at a scan is left over from an earlier failure
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_temps(folder: str) -> list[str]:
    """Remove the temporary files in `folder` (not below it) that a killed process left: those
    named by TEMP_NAME whose process no longer runs on this machine. Returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        match = TEMP_NAME.search(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(path) and not os.path.islink(path) and not _process_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(name)
    return removed


# ---- identities: cheap fingerprints of files, for records of what produced a result -------------


def file_identity(path: str) -> list[int]:
    """[size, mtime_ns] of a file: it changes when the file is rewritten, and costs no read."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def path_identity(path: str, limit: int = 2000) -> dict:
    """What a model source is: a local file or folder as its absolute path and the [size, mtime_ns]
    of each file in it (hidden entries skipped), or anything else (a hub id, a URL, a name) as
    given."""
    if not os.path.exists(path):
        return {"value": path}
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return {"path": path, "file": file_identity(path)}
    files = {}
    for here, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and not TEMP_NAME.search(name):
                full = os.path.join(here, name)
                files[os.path.relpath(full, path)] = file_identity(full)
                if len(files) >= limit:
                    return {"path": path, "files": files}
    return {"path": path, "files": files}


def _named(value):
    """The path or value of a path_identity, else None."""
    if isinstance(value, dict) and ("path" in value or "value" in value):
        return value.get("path", value.get("value"))
    return None


def _short(value, width: int = 120) -> str:
    if _named(value) is not None:  # a path_identity: its path is enough
        value = _named(value)
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def first_difference(old, new, where: str = "") -> str | None:
    """The first place where two JSON-like values differ, as `where: was X, now Y`; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict) and _named(old) == _named(new):
        for key in list(new) + [k for k in old if k not in new]:
            here = f"{where}.{key}" if where else str(key)
            if key not in old:
                return f"{here}: new"
            if key not in new:
                return f"{here}: no longer there"
            found = first_difference(old[key], new[key], here)
            if found:
                return found
        return None
    if old == new:
        return None
    return f"{where or 'value'}: was {_short(old)}, now {_short(new)}"


class MetricsFile:
    """metrics.jsonl: one JSON object per line, appended on the main process. On resume, the lines
    after the resume point are dropped, and so is a line cut short by a kill or a full disk."""

    def __init__(self, path: str, keep_up_to: int, main: bool):
        import logging
        import math

        self.path, self.main = path, main
        if not main or not os.path.exists(path):
            return
        kept, torn = [], 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    torn += 1
                    continue
                if isinstance(entry, dict) and entry.get("step", math.inf) <= keep_up_to:
                    kept.append(json.dumps(entry) + "\n")
        if torn:
            logging.getLogger(__name__).warning("%s: dropped %d unreadable line(s), as a killed run leaves them",
                                                path, torn)
        write_text_atomic("".join(kept), path)

    def append(self, step: int, values: dict) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
