#!/usr/bin/env bash
# Evaluate an SD3/SD3.5 checkpoint: papv2, hpsv2 and partiprompts at 1024 px with the pipeline's own sampling
# (flow-matching Euler, 28 steps, guidance_scale 7 = cfg 6 here), every metric, the table.
# Usage: bash scripts/eval/test_sd3.sh CKPT [eval.evaluate flags]   (CKPT: a train.py output folder, a
# transformer/ folder, a .safetensors or .pth state dict, or base). The base pipeline: MODEL_NAME
# (default stabilityai/stable-diffusion-3.5-medium) or --pretrain_path; --no_t5 samples without T5.
# A missing CKPT (none, or a flag in its place) ends in one `error:` line and status 2, as Python's errors do.
case "${1-}" in
  ""|-*) echo "error: CKPT missing: the first argument is the checkpoint (a folder, .safetensors, .pth or base); usage: $0 CKPT [flags]" >&2; exit 2;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
MODEL_NAME="${MODEL_NAME-stabilityai/stable-diffusion-3.5-medium}"
run eval.evaluate --pretrain_path "$MODEL_NAME" --unet_path "$1" "${@:2}"
