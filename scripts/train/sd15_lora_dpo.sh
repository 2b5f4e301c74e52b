#!/usr/bin/env bash
# SD1.5 + Diffusion-DPO with LoRA on one or more GPUs, with the winner-preserving safeguard. LoRA and
# optimisation settings are those of diffusers' Diffusion-DPO LoRA example
# (examples/research_projects/diffusion_dpo, its README's SD command and the script's beta default):
# rank 8 on the attention projections (alpha = rank), lr 1e-5 constant without warmup and not scaled by
# the batch, 16 pairs x 2 accumulation per GPU, beta 2500, gradient checkpointing, 10000 steps,
# a checkpoint every 2000. The safeguard's mu is the SD1.5 paper value (0.9); --no-use_winner_preserving
# gives diffusers' plain DPO. bf16 instead of the example's fp16; the example's 8-bit AdamW (bitsandbytes).
# The base with its adapters off is the reference: one UNet.
# Environment: MODEL_NAME, DATASET_NAME, OUTPUT_DIR, NUM_GPUS, ACCELERATE_CONFIG_FILE. Extra flags go to
# train.py and override these, e.g. --lora_rank=16 or --merge_lora.
FAMILY=sd15 LORA=1 BATCH=16 ACCUM=2 METHOD=diffusion-dpo BETA=2500 MU=0.9 ALPHA=0.0 LR=1e-5
LAUNCHER_FLAGS=(--use_lora --lora_rank=8 --use_8bit_adam --lr_scheduler=constant --lr_warmup_steps=0 --gradient_checkpointing
                --max_train_steps=10000 --checkpointing_steps=2000)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
