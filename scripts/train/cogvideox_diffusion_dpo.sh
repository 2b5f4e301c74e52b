#!/usr/bin/env bash
# CogVideoX (v-prediction DDPM) + Diffusion-DPO with the importance-sampled DPO paper's importance
# weighting (--timestep_weighting=importance: timesteps 100..1000, pairs whose weight is below 0.9
# masked, kept weights clipped to [0.8, 1.2]) and the winner-preserving safeguard (mu 0.6, as the
# SDXL launchers; --no-use_winner_preserving gives the paper's objective). Beta and what no source
# gives: as scripts/train/wan21_diffusion_dpo.sh (beta 20, lr 1e-8 x the effective batch, 1 x 16
# pairs per GPU, 1000 steps, AdamW with gradient checkpointing, bf16). Clips are the pipeline's: 49
# frames at 480x720.
# CogVideoX-2B (the default) trains whole. CogVideoX-5B: MODEL_NAME=THUDM/CogVideoX-5b LORA=1 trains
# LoRA adapters (rank 64 on the attention projections, lr 1e-5 not scaled by the batch; the base
# with its adapters off is the reference, so one transformer is in memory): a full 5B fine-tune
# needs its fp32 weights, gradients and AdamW moments, 16 bytes x 5.57 G parameters = 89 GB, plus
# a bf16 reference (11 GB) and T5-XXL (9.5 GB) before activations: more than one 80 GB GPU.
# Environment: MODEL_NAME (any CogVideoXPipeline folder or hub id), DATASET_NAME (video pairs: see
# the README, "Video preference data"), OUTPUT_DIR, NUM_GPUS, LORA. Extra flags go to train.py and
# override these.
FAMILY=cogvideox BATCH=1 ACCUM=16 METHOD=diffusion-dpo BETA=20 MU=0.6 ALPHA=0.0 LR=1e-8
LAUNCHER_FLAGS=(--timestep_weighting=importance --is_mask_threshold=0.9 --is_clip_eps=0.2
                --max_train_steps=1000 --checkpointing_steps=250 --lr_warmup_steps=100)
if [ "${LORA-0}" = 1 ]; then
  LR=1e-5
  LAUNCHER_FLAGS+=(--use_lora --lora_rank=64 --lora_alpha=64)
fi
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
