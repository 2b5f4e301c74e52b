"""The launchers' environment, checked before anything runs (called by _launch.sh).

    python scripts/train/_check_env.py NAME...

Each NAME (MODEL_NAME, DATASET_NAME, ...) must be set to a non-empty value: the launcher gives the
defaults to the ones that are unset, so an empty one is a mistake, not a request for the default.
NUM_GPUS, when set, must be a positive integer; unset, the GPUs torch finds are counted. Prints the
number of GPUs to launch on; a wrong value ends in one `error:` line and exit status 2.
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sdpo.errors import InputError, reports_input_errors  # noqa: E402


@reports_input_errors
def main(names: list[str]) -> int:
    for name in names:
        if not os.environ.get(name, "").strip():
            raise InputError(f"{name} is empty: set it to a value, or unset it for the launcher's default")
    gpus = os.environ.get("NUM_GPUS")
    if gpus is None:
        import torch

        count = torch.cuda.device_count()
        if count < 1:
            raise InputError("no GPU found; set NUM_GPUS=N to launch anyway")
    else:
        count = int(gpus) if re.fullmatch(r"[0-9]+", gpus) else 0
        if count < 1:
            raise InputError(f"NUM_GPUS must be a positive integer, got {gpus!r}: the number of GPUs to launch on")
    print(count)
    return count


if __name__ == "__main__":
    main(sys.argv[1:])
