#!/usr/bin/env bash
# Wan2.1-T2V-1.3B (rectified flow) + Diffusion-DPO with the importance-sampled DPO paper's importance
# weighting (--timestep_weighting=importance: noise levels 100..1000 of the training grid, pairs
# whose weight is below 0.9 masked, kept weights clipped to [0.8, 1.2]) and the winner-preserving
# safeguard (mu 0.6, as the SDXL launchers; --no-use_winner_preserving gives the paper's objective).
# Sources, and what none gives: beta 20 is the paper's 0.02 for its importance-sampled and C&M
# objectives on video (its appendix table A1, as an ICLR 2026 review of the paper quotes it) in
# Diffusion-DPO's units (beta x T, T = 1000: Diffusion-DPO's 5000 is the paper's image value 5);
# its Diffusion-DPO baseline used 2 (2000 here). The learning rate, batch and step count are not
# in any source we could read: lr 1e-8 x the effective batch (--scale_lr, as the SD1.5 launcher),
# 1 clip pair x 16 accumulation per GPU, 1000 steps, AdamW with gradient checkpointing, bf16. Clips
# are the pipeline's: 81 frames at 480x832 (train.py's defaults for Wan2.1). Sweep beta and lr.
# Environment: MODEL_NAME (any WanPipeline folder or hub id), DATASET_NAME (video pairs: see the
# README, "Video preference data"), OUTPUT_DIR, NUM_GPUS. Extra flags go to train.py and override these.
FAMILY=wan21 BATCH=1 ACCUM=16 METHOD=diffusion-dpo BETA=20 MU=0.6 ALPHA=0.0 LR=1e-8
LAUNCHER_FLAGS=(--timestep_weighting=importance --is_mask_threshold=0.9 --is_clip_eps=0.2
                --max_train_steps=1000 --checkpointing_steps=250 --lr_warmup_steps=100)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
