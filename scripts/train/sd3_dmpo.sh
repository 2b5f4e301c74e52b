#!/usr/bin/env bash
# SD3.5-medium (rectified flow) + dmpo with the winner-preserving safeguard, at the SDXL launcher's
# DMPO settings (beta 6000, alpha 0.01, mu 0.6, lr 1e-9 x the effective batch; no paper gives them for
# SD3: see sd3_diffusion_dpo.sh and the README, "SD3/SD3.5").
# Environment: MODEL_NAME, DATASET_NAME, OUTPUT_DIR, NUM_GPUS. Extra flags go to train.py and override these.
FAMILY=sd3 BATCH=8 ACCUM=32 METHOD=dmpo BETA=6000 MU=0.6 ALPHA=0.01 LR=1e-9
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
