#!/usr/bin/env bash
# Multi-node data-parallel training under SLURM: one task per node, each running a launcher of
# scripts/train/ with an accelerate config written for this job (all GPUs of all nodes, node 0 as
# the main process). Adjust the #SBATCH lines to your cluster; the launcher's environment
# (MODEL_NAME, DATASET_NAME, OUTPUT_DIR on a shared file system) passes through.
#   sbatch scripts/train/slurm_multi_node.sh sd15_diffusion_dpo [train.py flags]
#SBATCH --job-name=preference-training
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
set -euo pipefail
root="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
launcher="${1:-sd15_diffusion_dpo}"
shift || true
[ -f "$root/scripts/train/$launcher.sh" ] || { echo "error: no launcher scripts/train/$launcher.sh" >&2; exit 2; }
nodes="${SLURM_NNODES:?run this with sbatch (SLURM_NNODES is not set)}"
gpus="${SLURM_GPUS_ON_NODE:-8}"
head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
config="$root/outputs/slurm-${SLURM_JOB_ID:-job}/accelerate.yaml"
mkdir -p "$(dirname "$config")"
cat > "$config" <<YAML
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: $nodes
num_processes: $((nodes * gpus))
machine_rank: 0
main_process_ip: $head
main_process_port: ${MAIN_PROCESS_PORT:-29500}
rdzv_backend: static
same_network: true
gpu_ids: all
mixed_precision: bf16
dynamo_config: {}
use_cpu: false
YAML
bash "$root/scripts/setup.sh"  # once, before the nodes start (they share the virtual environment)
export ACCELERATE_CONFIG_FILE="$config"
# Each node: its rank is SLURM_NODEID.
srun --ntasks-per-node=1 bash -c 'MACHINE_RANK=$SLURM_NODEID exec bash "$0" "$@"' \
  "$root/scripts/train/$launcher.sh" "$@"
