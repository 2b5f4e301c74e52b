#!/usr/bin/env bash
# SD3.5-medium (rectified flow) + diffusion-dpo with the winner-preserving safeguard. No paper gives
# these settings for SD3; they are the SDXL launcher's (docs/methods.md, "The paper's settings":
# beta 5000, mu 0.6, lr 1e-9 x the effective batch, Adafactor with gradient checkpointing at 1024 px),
# with sigmas drawn as diffusers' SD3 training examples draw them (logit-normal, mean 0, std 1, then
# the scheduler's shift). Why beta stays 5000: see the README, "SD3/SD3.5". Unverified on SD3: sweep it.
# Environment: MODEL_NAME (any StableDiffusion3Pipeline folder or hub id), DATASET_NAME, OUTPUT_DIR, NUM_GPUS.
# Extra flags go to train.py and override these, e.g. --no_t5 (much less memory) or --timestep_weighting=importance.
FAMILY=sd3 BATCH=8 ACCUM=32 METHOD=diffusion-dpo BETA=5000 MU=0.6 ALPHA=0.0 LR=1e-9
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
