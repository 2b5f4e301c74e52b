#!/usr/bin/env bash
# Shared by the evaluation launchers (sourced): set up the environment and run a Python module.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/scripts/setup.sh"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
run() { exec "$root/.venv/bin/python" -m "$@"; }
