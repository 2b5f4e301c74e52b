"""Checks of command-line values shared by the entry points (train.py, bench.py, demo.py, eval/,
python -m sdpo.cache, scripts/*.py). Each raises an InputError that names the flag, so that a wrong
value ends in one `error:` line and exit status 2 before anything is loaded."""

from __future__ import annotations

import argparse
import os

from sdpo.errors import InputError
from sdpo.files import check_output_dir


MAX_IMAGE_SIZE = 8192  # pixels per side; SD1.5 is trained at 512, SDXL at 1024


def image_size(value: int, flag: str) -> int:
    """A resolution, height or width: a positive multiple of 8, what the Stable Diffusion VAEs need
    (they downsample by 8; the latent must have whole pixels), and at most MAX_IMAGE_SIZE: far
    beyond what these models run at, where a typo (an extra zero) would only fail after the models
    loaded, out of memory."""
    if value < 8 or value % 8:
        raise InputError(f"{flag} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    if value > MAX_IMAGE_SIZE:
        raise InputError(f"{flag} must be at most {MAX_IMAGE_SIZE} (SD1.5 is trained at 512, SDXL at 1024), got {value}")
    return value


def no_empty_values(args: argparse.Namespace, positional=(), allowed=()) -> None:
    """No string value, alone or in a list, may be empty or blank: "" reads as "not given" in too
    many places (a default taken silently, the current folder taken as a path). `positional` names
    the arguments shown as NAME rather than --name; `allowed` those where "" has a meaning."""
    for name, value in vars(args).items():
        if name in allowed:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not item.strip():
                shown = name if name in positional else f"--{name}"
                raise InputError(f"{shown} is empty: give a value, or leave the flag out for its default")


def device(value: str | None, flag: str = "--device") -> str:
    """The device to run on: the given one, checked to exist on this machine, or cuda when there is
    one (cpu otherwise)."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{flag} {value!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{flag} {value}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{flag} {value}: this machine has {count} CUDA device(s), numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{flag} {value}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise InputError(f"{flag} {value}: not a device to run on; use cpu, cuda, cuda:N or mps")
    return value


def output_file(path: str, flag: str, suffixes: tuple[str, ...] | None = None) -> str:
    """A file to (re)write: not a folder, in a folder that exists and is writable or could be made
    (nothing is made here), and, when `suffixes` is given, ending in one of them."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: a folder, not a file")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag, create=False)
    if suffixes is not None and not path.lower().endswith(suffixes):
        raise InputError(f"{flag} {path}: the name must end in one of {', '.join(suffixes)}")
    return path
