#!/usr/bin/env bash
# Evaluate an SD1.5 checkpoint: papv2, hpsv2 and partiprompts at 512 px, every metric, the summary table.
# Usage: bash scripts/eval/test_sd15.sh CKPT [eval.evaluate flags]   (CKPT: unet.pth, .safetensors, folder, a LoRA folder or base)
# A missing CKPT (none, or a flag in its place) ends in one `error:` line and status 2, as Python's errors do.
case "${1-}" in
  ""|-*) echo "error: CKPT missing: the first argument is the checkpoint (unet.pth, .safetensors, folder, a LoRA folder or base); usage: $0 CKPT [flags]" >&2; exit 2;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run eval.evaluate --unet_path "$1" "${@:2}"
