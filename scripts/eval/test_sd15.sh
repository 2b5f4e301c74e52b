#!/usr/bin/env bash
# Evaluate an SD1.5 checkpoint: papv2, hpsv2 and partiprompts at 512 px, every metric, the summary table.
# Usage: bash scripts/eval/test_sd15.sh CKPT [eval.evaluate flags]   (CKPT: unet.pth, .safetensors, folder or base)
[ $# -ge 1 ] || { echo "usage: $0 CKPT [flags]" >&2; exit 2; }
source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run eval.evaluate --unet_path "$1" "${@:2}"
