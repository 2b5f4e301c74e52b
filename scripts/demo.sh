#!/usr/bin/env bash
# The built-in demo on CPU: tiny random models, synthetic pairs, every objective with and without
# the safeguard, and a plot (demo_output/safeguard.png). Extra arguments go to `python demo.py`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" demo.py "$@"
