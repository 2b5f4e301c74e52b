#!/usr/bin/env bash
# Compare two generation manifests by per-prompt win rates on every metric.
# Usage: bash scripts/eval/test_vs.sh --json_a A.json --json_b B.json --label_a A --label_b B [--device] [--batch_size] [--outdir]
source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run eval.versus "$@"
