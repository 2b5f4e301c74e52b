"""Shared code for preference training of diffusion models: the objectives and the safeguard
(`losses`), timestep weighting (`timesteps`), data (`data`), text conditioning
(`conditioning`), checkpoints (`checkpoints`) and the offline tiny models (`tiny`)."""

import logging as _logging

# peft and diffusers import bitsandbytes when it is installed, and at import its CPU backend warns
# that an optional 4-bit matmul kernel ("kernels-community") is missing: nothing here uses 4-bit
# matmuls, and the 8-bit optimizers (train.py --use_8bit_adam) do not need it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
