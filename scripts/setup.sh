#!/usr/bin/env bash
# Create (or reuse) .venv in the checkout and install requirements.txt into it.
# Reuse is keyed on a hash of requirements.txt, so editing it triggers a re-install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $venv (a few minutes the first time)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >&2
"$venv/bin/python" -m pip install -q -r "$root/requirements.txt" >&2
# torch and torchvision must agree (the CPU-only torch 2.13.0 wheel has no torchvision that imports).
"$venv/bin/python" -c "import torch, torchvision; torchvision.ops.nms" >&2
echo "$want" > "$stamp"
