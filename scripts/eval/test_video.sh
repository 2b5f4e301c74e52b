#!/usr/bin/env bash
# Evaluate a Wan2.1 or CogVideoX checkpoint: papv2, hpsv2 and partiprompts as videos sampled by the
# pipeline itself (its scheduler, 50 steps, its guidance: cfg 4 for Wan2.1, 5 for CogVideoX, = the
# pipeline's guidance_scale - 1), its size and length (Wan2.1 480x832, 81 frames; CogVideoX 480x720,
# 49 frames). Each video is saved as mp4 with its first, middle and last frames as PNG; every image
# metric scores a video as the mean over its frames; then the table. VBench is not run here (see
# the README, "Video models").
# Usage: bash scripts/eval/test_video.sh CKPT [eval.evaluate flags]   (CKPT: a train.py output folder,
# a transformer/ folder, a .safetensors state dict, or base). The base pipeline: MODEL_NAME (default
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or --pretrain_path; the family is read from its model_index.json.
# A missing CKPT (none, or a flag in its place) ends in one `error:` line and status 2, as Python's errors do.
case "${1-}" in
  ""|-*) echo "error: CKPT missing: the first argument is the checkpoint (a folder, .safetensors or base); usage: $0 CKPT [flags]" >&2; exit 2;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
MODEL_NAME="${MODEL_NAME-Wan-AI/Wan2.1-T2V-1.3B-Diffusers}"
run eval.evaluate --pretrain_path "$MODEL_NAME" --unet_path "$1" "${@:2}"
