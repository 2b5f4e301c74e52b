#!/usr/bin/env bash
# SDXL + Diffusion-DPO with LoRA on one or more GPUs, with the winner-preserving safeguard. LoRA and
# optimisation settings are those of diffusers' Diffusion-DPO LoRA example
# (examples/research_projects/diffusion_dpo, its README's SDXL command): rank 8 on the attention
# projections (alpha = rank), lr 1e-5 constant without warmup and not scaled by the batch, 8 pairs x 2
# accumulation per GPU, gradient checkpointing, the fp16-fix VAE, 2000 steps, a checkpoint every 500;
# beta 5000 (the reference's SDXL value, as sdxl_diffusion_dpo.sh). 8-bit AdamW, not Adafactor
# (the adapters are small). The safeguard's mu is the SDXL paper value (0.6); --no-use_winner_preserving
# gives diffusers' plain DPO. bf16 instead of the example's fp16; the example's 8-bit AdamW (bitsandbytes).
# The base with its adapters off is the reference: one UNet.
# Environment: MODEL_NAME, VAE_NAME, DATASET_NAME, OUTPUT_DIR, NUM_GPUS, ACCELERATE_CONFIG_FILE. Extra
# flags go to train.py and override these, e.g. --lora_rank=16 or --merge_lora.
FAMILY=sdxl LORA=1 BATCH=8 ACCUM=2 METHOD=diffusion-dpo BETA=5000 MU=0.6 ALPHA=0.0 LR=1e-5
LAUNCHER_FLAGS=(--use_lora --lora_rank=8 --use_8bit_adam --lr_scheduler=constant --lr_warmup_steps=0 --no-use_adafactor
                --max_train_steps=2000 --checkpointing_steps=500)
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
