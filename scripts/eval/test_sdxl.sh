#!/usr/bin/env bash
# Evaluate an SDXL checkpoint: papv2, hpsv2 and partiprompts at 1024 px (fp16-fix VAE), every metric, the table.
# Usage: bash scripts/eval/test_sdxl.sh CKPT [eval.evaluate flags]   (CKPT: unet.pth, .safetensors, folder, a LoRA folder or base)
# A missing CKPT (none, or a flag in its place) ends in one `error:` line and status 2, as Python's errors do.
case "${1-}" in
  ""|-*) echo "error: CKPT missing: the first argument is the checkpoint (unet.pth, .safetensors, folder, a LoRA folder or base); usage: $0 CKPT [flags]" >&2; exit 2;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run eval.evaluate --sdxl --unet_path "$1" "${@:2}"
