#!/usr/bin/env bash
# SDXL + dmpo with the winner-preserving safeguard, at the reference's hyperparameters
# (docs/methods.md, "The paper's settings"). Environment: MODEL_NAME, DATASET_NAME, OUTPUT_DIR, NUM_GPUS, VAE_NAME.
# Extra flags go to train.py and override these, e.g. --winner_preserving_mu=0.5 or --timestep_weighting=importance.
FAMILY=sdxl BATCH=8 ACCUM=32 METHOD=dmpo BETA=6000 MU=0.6 ALPHA=0.01 LR=1e-9
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
