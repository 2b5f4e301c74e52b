#!/usr/bin/env bash
# Shared by the launchers (sourced): the reference's common settings (a gradient-norm clip of 1.0 with
# both optimizers, the reference's bf16 numerics), GPU detection, the effective batch, and
# `accelerate launch train.py`. The caller sets FAMILY (sd15, sdxl, sd3, wan21 or cogvideox), METHOD, BETA, MU, LR, BATCH, ACCUM and
# optionally ALPHA and LAUNCHER_FLAGS (an array: the LoRA launchers' own settings, after the common
# ones); the user's extra flags ("$@") come last and override anything here.
# ACCELERATE_CONFIG_FILE, when set, is the user's accelerate config (multi-node, FSDP, ...): it
# decides the processes, machines, precision and dynamo settings, and the launcher passes none of its own.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/scripts/setup.sh"
python="$root/.venv/bin/python"
# A variable the environment leaves unset takes the default here; one set to "" is an error (below).
# Per family: the base model, the resolution and the memory savers (Adafactor below).
case "$FAMILY" in
  sdxl)
    MODEL_NAME="${MODEL_NAME-stabilityai/stable-diffusion-xl-base-1.0}"
    VAE_NAME="${VAE_NAME-madebyollin/sdxl-vae-fp16-fix}"
    settings=(MODEL_NAME VAE_NAME)
    arch=(--sdxl --resolution=1024 --pretrained_vae_model_name_or_path="$VAE_NAME" --gradient_checkpointing)
    big=1 ;;
  sd3)  # the family is read from the pipeline's model_index.json: no flag names it
    MODEL_NAME="${MODEL_NAME-stabilityai/stable-diffusion-3.5-medium}"
    settings=(MODEL_NAME)
    arch=(--resolution=1024 --gradient_checkpointing)
    big=1 ;;
  wan21|cogvideox)  # clips: the pipeline's size and length (train.py's defaults), AdamW with checkpointing
    if [ "$FAMILY" = wan21 ]; then default_model=Wan-AI/Wan2.1-T2V-1.3B-Diffusers; else default_model=THUDM/CogVideoX-2b; fi
    MODEL_NAME="${MODEL_NAME-$default_model}"
    settings=(MODEL_NAME)
    arch=(--gradient_checkpointing --no-use_adafactor)
    big=0 ;;
  *)
    MODEL_NAME="${MODEL_NAME-stable-diffusion-v1-5/stable-diffusion-v1-5}"
    settings=(MODEL_NAME)
    arch=(--resolution=512 --no-use_adafactor --no-gradient_checkpointing)
    big=0 ;;
esac
# yuvalkirstain/pickapic_v2 has answered 404 on the hub since 2025: point DATASET_NAME at a local copy.
# Video pairs: what scripts/convert_video_pairs.py writes (see the README, "Video preference data").
if [ "$FAMILY" = wan21 ] || [ "$FAMILY" = cogvideox ]; then
  DATASET_NAME="${DATASET_NAME-data/videogen-rewardbench-pairs}"
else
  DATASET_NAME="${DATASET_NAME-yuvalkirstain/pickapic_v2}"
fi
OUTPUT_DIR="${OUTPUT_DIR-outputs/$(basename "$0" .sh)}"
settings+=(DATASET_NAME OUTPUT_DIR)
export "${settings[@]}"
# An empty setting, a NUM_GPUS that is not a positive integer or an unusable ACCELERATE_CONFIG_FILE
# ends here (one `error:` line, status 2); otherwise this prints the process count (the config's,
# NUM_GPUS, or the GPUs torch finds), the mixed precision (the config's, or bf16) and the config's
# distributed type (NO without a config).
checked=$("$python" "$root/scripts/train/_check_env.py" "${settings[@]}")
read -r NUM_GPUS PRECISION KIND <<< "$checked"
# SDXL and SD3 full fine-tunes use Adafactor (the reference's SDXL setting), except under FSDP, whose
# sharded parameters transformers' Adafactor cannot update: AdamW there (its state is sharded too).
if [ "$big" = 1 ] && [ "${LORA-0}" != 1 ]; then
  if [ "$KIND" = FSDP ]; then
    echo "FSDP: AdamW instead of Adafactor (Adafactor cannot update sharded parameters)"
  else
    arch+=(--use_adafactor)
  fi
fi
fsdp=false
[ "$KIND" = FSDP ] && fsdp=true
echo "effective batch: $BATCH pairs per GPU x $ACCUM accumulation steps x $NUM_GPUS GPUs =" \
     "$((BATCH * ACCUM * NUM_GPUS)) pairs per step (the papers used 2048; extra flags may change this," \
     "train.py logs the batch it uses)"
if [ -n "${ACCELERATE_CONFIG_FILE-}" ]; then
  launch=(--config_file "$ACCELERATE_CONFIG_FILE")
  # Multi-node: each machine's rank (and, when set, the main machine's address) over the file's.
  [ -n "${MACHINE_RANK-}" ] && launch+=(--machine_rank "$MACHINE_RANK")
  [ -n "${MAIN_PROCESS_IP-}" ] && launch+=(--main_process_ip "$MAIN_PROCESS_IP")
else
  launch=(--num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
  [ "$NUM_GPUS" -gt 1 ] && launch=(--multi_gpu "${launch[@]}")
fi
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
[ "${LORA-0}" = 1 ] || LAUNCHER_FLAGS+=(--scale_lr)  # the reference scales its lr; diffusers' LoRA example does not
train_args=(
  --pretrained_model_name_or_path="$MODEL_NAME" --dataset_name="$DATASET_NAME" --output_dir="$OUTPUT_DIR"
  "${arch[@]}" --train_batch_size=$BATCH --gradient_accumulation_steps=$ACCUM --dataloader_num_workers=16
  --max_train_steps=2000 --checkpointing_steps=500
  --lr_scheduler=constant_with_warmup --lr_warmup_steps=500 --learning_rate="$LR"
  --mixed_precision="$PRECISION" --allow_tf32 --loss_precision=reference --max_grad_norm=1.0 --report_to=tensorboard
  --train_method="$METHOD" --beta_dpo="$BETA" --dmpo_alpha="${ALPHA:-0.0}"
  --use_winner_preserving --winner_preserving_mu="$MU"
  "${LAUNCHER_FLAGS[@]}" "$@"
)
# Check the settings, paths, checkpoint and data first, in this process: a mistake ends here with
# our one-line message and exit status 2, not inside accelerate launch (which would turn it into
# its own traceback and status 1).
WORLD_SIZE="$NUM_GPUS" ACCELERATE_USE_FSDP="$fsdp" "$python" train.py "${train_args[@]}" --check_only >/dev/null
exec "$python" -m accelerate.commands.launch "${launch[@]}" train.py "${train_args[@]}"
