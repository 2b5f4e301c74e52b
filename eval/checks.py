"""Checks of what users type into the evaluation commands, each failing with one InputError line
that names the flag and the problem (the entry points turn it into `error: ...` and exit status 2).

They run before any model is loaded, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import json
import math
import os

from sdpo import flags
from sdpo.errors import ArgumentParser, InputError, first_line


class Parser(ArgumentParser):
    """The evaluation commands' parser: usage errors are InputErrors (one `error:` line, exit
    status 2), and so is an empty value of any flag or argument (see sdpo.flags.no_empty_values)."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        flags.no_empty_values(parsed, positional={a.dest for a in self._actions if not a.option_strings})
        return parsed


def check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def at_least_one(value, flag: str) -> None:
    if value is not None:
        check(value >= 1, f"{flag} must be at least 1, got {value}")


def folder(path: str, flag: str) -> str:
    """An existing folder to read from."""
    check(not os.path.isfile(path), f"{flag} {path}: a file, not a folder")
    check(os.path.isdir(path), f"{flag} {path}: no such folder")
    return path


def seed(value: int, flag: str = "--seed") -> None:
    check(0 <= value < 2**64, f"{flag} must lie in [0, 2**64), got {value}")


def guidance(value: float, flag: str = "--cfg") -> None:
    """cfg scales pred_cond - pred_uncond: 0 is the conditional prediction alone (no guidance);
    a negative value would push away from the prompt, which no evaluation means."""
    check(math.isfinite(value) and value >= 0, f"{flag} must be a finite number >= 0 (0: no guidance), got {value}")


def distinct(values, flag: str) -> None:
    seen = set()
    for value in values:
        check(value not in seen, f"{flag}: {value} is given twice")
        seen.add(value)


def read_json(path: str, flag: str):
    """A JSON file's content, or one line saying why it cannot be read."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: a folder, not a JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{flag} {path}: not UTF-8 text ({first_line(err)})") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{flag} {path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}; "
                         f"truncated or not a JSON file?)") from None
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot read it ({err.strerror or first_line(err)})") from None


def read_records(path: str, flag: str, what: str, fields: tuple[str, ...]) -> list[dict]:
    """A non-empty JSON list of records (a prompt suite, a manifest), each an object with a string
    for every one of `fields`; else one line naming the first problem."""
    records = read_json(path, flag)
    names = " and ".join(f"'{f}'" for f in fields)
    if not isinstance(records, list):
        raise InputError(f"{flag} {path}: expected a JSON list of records with {names}, got a {type(records).__name__}")
    if not records:
        raise InputError(f"{flag} {path}: an empty {what} (no records)")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str) for f in fields):
            raise InputError(f"{flag} {path}: record {index} is not an object with a string {names}")
    return records
