#!/usr/bin/env bash
# SD1.5 + diffusion-dpo with the winner-preserving safeguard, at the reference's hyperparameters
# (docs/methods.md, "The paper's settings"). Environment: MODEL_NAME, DATASET_NAME, OUTPUT_DIR, NUM_GPUS.
# Extra flags go to train.py and override these, e.g. --winner_preserving_mu=0.5 or --timestep_weighting=importance.
FAMILY=sd15 BATCH=8 ACCUM=32 METHOD=diffusion-dpo BETA=5000 MU=0.9 ALPHA=0.0 LR=1e-8
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
