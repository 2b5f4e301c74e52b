#!/usr/bin/env bash
# Create (or reuse) .venv in the checkout and install requirements.txt into it.
# Reuse is keyed on a hash of requirements.txt, so editing it triggers a re-install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
want="$(cat "$root/requirements.txt" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $venv (a few minutes the first time)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >&2
"$venv/bin/python" -m pip install -q -r "$root/requirements.txt" >&2
# The scorer packages, for the tests that compare our scorers with the packages' own model code.
# Without their dependencies: image-reward pins a timm that breaks open_clip, and pip backtracks to an
# image-reward that does not build when both are resolved with the rest (see the README).
"$venv/bin/python" -m pip install -q --no-deps hpsv2==1.2.0 image-reward==1.5 >&2
# hpsv2's wheel lacks its tokenizer vocabulary, which is open_clip's file.
"$venv/bin/python" - <<'PY'
import os, shutil, open_clip, importlib.util
target = os.path.join(os.path.dirname(importlib.util.find_spec("hpsv2").submodule_search_locations[0]), "hpsv2", "src", "open_clip")
shutil.copy(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"), target)
PY
# torch and torchvision must agree (the CPU-only torch 2.13.0 wheel has no torchvision that imports).
"$venv/bin/python" -c "import torch, torchvision; torchvision.ops.nms" >&2
echo "$want" > "$stamp"
