#!/usr/bin/env bash
# Evaluate an SDXL checkpoint: papv2, hpsv2 and partiprompts at 1024 px (fp16-fix VAE), every metric, the table.
# Usage: bash scripts/eval/test_sdxl.sh CKPT [eval.evaluate flags]   (CKPT: unet.pth, .safetensors, folder or base)
[ $# -ge 1 ] || { echo "usage: $0 CKPT [flags]" >&2; exit 2; }
source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run eval.evaluate --sdxl --unet_path "$1" "${@:2}"
