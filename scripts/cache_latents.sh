#!/usr/bin/env bash
# Build a latent cache for train.py --latent_cache: every image of every pair encoded once.
# Usage: bash scripts/cache_latents.sh --pretrained_model_name_or_path M --dataset_name D --resolution R \
#          --output_dir C [--sdxl] [--pretrained_vae_model_name_or_path V] [--mixed_precision bf16] [...]
# Then train with the same flags plus --latent_cache C. See python -m sdpo.cache --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m sdpo.cache "$@"
