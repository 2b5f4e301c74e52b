"""The launchers' environment, checked before anything runs (called by _launch.sh).

    python scripts/train/_check_env.py NAME...

Each NAME (MODEL_NAME, DATASET_NAME, ...) must be set to a non-empty value: the launcher gives the
defaults to the ones that are unset, so an empty one is a mistake, not a request for the default.
NUM_GPUS, when set, must be a positive integer; unset, the GPUs torch finds are counted.
ACCELERATE_CONFIG_FILE, when set, must be a readable accelerate config (YAML or JSON, as `accelerate
config` writes it): its num_processes (over all machines) and mixed_precision are used, and an FSDP
config with one process is refused (FSDP shards over processes; one process has nothing to shard over).
Prints the process count, the mixed precision (bf16 without a config) and the config's distributed
type (NO without one); a wrong value ends in one `error:` line and exit status 2.
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sdpo.errors import InputError, first_line, reports_input_errors  # noqa: E402


@reports_input_errors
def main(names: list[str]) -> int:
    for name in names:
        if not os.environ.get(name, "").strip():
            raise InputError(f"{name} is empty: set it to a value, or unset it for the launcher's default")
    config_file = os.environ.get("ACCELERATE_CONFIG_FILE")
    if config_file is not None:
        count, precision, kind = read_accelerate_config(config_file)
        print(count, precision, kind)
        return count
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
    print(count, "bf16", "NO")
    return count


def read_accelerate_config(path: str) -> tuple[int, str, str]:
    """(num_processes, mixed_precision, distributed_type) of an accelerate config file, checked."""
    import yaml

    where = f"ACCELERATE_CONFIG_FILE {path}"
    try:
        with open(path) as f:
            config = yaml.safe_load(f)  # YAML, or JSON (a subset of YAML)
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{where}: unreadable ({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(config, dict):
        raise InputError(f"{where}: not an accelerate config (a mapping of settings, as `accelerate config` writes)")
    processes = config.get("num_processes", 1)
    if not isinstance(processes, int) or processes < 1:
        raise InputError(f"{where}: num_processes must be a positive integer, got {processes!r}")
    precision = config.get("mixed_precision", "no")
    precision = "no" if precision is False else str(precision)  # YAML reads an unquoted no as false
    if precision not in ("no", "fp16", "bf16"):
        raise InputError(f"{where}: mixed_precision {precision!r}; this project trains in no, fp16 or bf16")
    kind = config.get("distributed_type", "NO")
    kind = "NO" if kind is False else str(kind).upper()  # (an unquoted NO, too)
    if kind == "FSDP" and processes < 2:
        raise InputError(f"{where}: an FSDP config with num_processes {processes}; FSDP shards the model over "
                         f"processes, so it needs at least 2 (one GPU: drop the config, or use --use_lora)")
    return processes, precision, kind


if __name__ == "__main__":
    main(sys.argv[1:])
