"""Preference training of Stable Diffusion 1.5 / SDXL UNets and SD3/SD3.5 transformers: Diffusion-DPO,
DSPO, DMPO or SFT, each with the optional winner-preserving safeguard of Diffusion-SDPO and timestep
weighting. The model family is read from the base pipeline's model_index.json (sdpo/families.py).

One GPU:         accelerate launch --num_processes 1 train.py --pretrained_model_name_or_path ... --dataset_name ...
Eight GPUs:      accelerate launch --num_processes 8 --multi_gpu train.py ...
Several nodes:   accelerate launch --num_machines 2 --machine_rank R --main_process_ip IP --num_processes 16 train.py ...
CPU (tests):     accelerate launch --cpu --num_processes 1 train.py ... --mixed_precision no
The launchers in scripts/train/ set the papers' hyperparameters. The math lives in sdpo/losses.py
and sdpo/timesteps.py; this file loads models and data, loops and saves.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
import logging
import math
import os
import random
import shutil
import sys
import time

import torch

from sdpo import checkpoints, families, host_memory, hub, lora, models
from sdpo.checkpoints import CONFIG_FILE
from sdpo.conditioning import PromptEncoder
from sdpo.data import PairBatch, build_dataloader, check_data, choose_winners, next_batch
from sdpo.errors import ArgumentParser, HelpFormatter, InputError, RunStopped, first_line, reports_input_errors
from sdpo.files import MetricsFile, check_output_dir, write_json_atomic
from sdpo.flags import image_size, no_empty_values
from sdpo.losses import check_mu, preference_loss, sft_loss, winner_preserving_scale
from sdpo.timesteps import MODES, log_weights, pair_log_weights, pair_weights, timestep_range

logger = logging.getLogger("train")

LOSS_PRECISIONS = ("reference", "fp32")
# The reference's names for its choice models, and ours.
CHOICE_MODELS = {"pickscore": "pickscore", "hps": "hpsv2", "hpsv2": "hpsv2", "aes": "aesthetics",
                 "aesthetics": "aesthetics", "clip": "clip", "imagereward": "imagereward"}


def choice_model(name: str) -> str | None:
    """--choice_model: our metric names or the reference's (aes, hps, clip, pickscore); '' is none."""
    if not name:
        return None
    if name not in CHOICE_MODELS:
        raise argparse.ArgumentTypeError(f"unknown choice model {name!r}; choose one of {', '.join(CHOICE_MODELS)}")
    return CHOICE_MODELS[name]


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    # models
    a("--pretrained_model_name_or_path", required=True, help="base pipeline: hub id or local folder")
    a("--pretrained_vae_model_name_or_path", default=None, help="a separate VAE (SDXL: madebyollin/sdxl-vae-fp16-fix)")
    a("--revision", default=None, help="revision of the base pipeline on the hub")
    a("--sdxl", action="store_true",
      help="the base is an SDXL pipeline (two text encoders); checked against the pipeline's model_index.json, "
           "which decides the family (SD1.x, SDXL or SD3/SD3.5)")
    a("--no_t5", action="store_true",
      help="SD3: leave out the T5 text encoder (zeros in its place, as StableDiffusion3Pipeline with "
           "text_encoder_3=None): much less memory")
    a("--unet_init", default="",
      help="initialise the policy and the reference UNet from this UNet (folder, .safetensors or .pth), as the reference")
    a("--ref_unet", default="", metavar="PATH|base",
      help="a different reference UNet: 'base' (the base pipeline's) or a UNet path (default: --unet_init, else base)")
    a("--cache_dir", default=None, help="where downloaded models and datasets are stored (as datasets/diffusers' cache_dir)")
    # LoRA
    a("--use_lora", action="store_true",
      help="train LoRA adapters (peft) on the frozen UNet instead of the whole UNet; the reference is the same "
           "UNet with its adapters off (no second UNet), unless --ref_unet names another one")
    a("--lora_rank", type=int, default=8, help="LoRA rank (diffusers' Diffusion-DPO example runs 8)")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha / rank (default: the rank)")
    a("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input")
    a("--lora_target_modules", nargs="+", default=list(lora.DEFAULT_TARGETS), metavar="NAME",
      help="modules that get adapters: names or name suffixes (default: the attention projections, as diffusers' "
           "Diffusion-DPO example)")
    a("--merge_lora", action="store_true", help="with --use_lora: also write the UNet with the adapters merged, to unet/ (SD3: "
                                                  "the transformer, to transformer/)")
    # data
    a("--dataset_name", default=None, help="hub id, or a local folder with data/<split>-*.parquet, or one parquet file")
    a("--dataset_revision", default=None, help="revision of the dataset on the hub")
    a("--dataset_config_name", default=None, help="configuration of a hub dataset (load_dataset's second argument)")
    a("--train_data_dir", default=None,
      help="a subfolder of the dataset to read (load_dataset's data_dir; for a local folder, a subfolder of it)")
    a("--caption_column", default="caption", help="the dataset's caption column")
    a("--image_column", default=None, help=argparse.SUPPRESS)  # refused in check_settings(): pairs are jpg_0 and jpg_1
    a("--split", default="train", help="dataset split (only 'train' is shuffled, as in the reference)")
    a("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    a("--max_train_samples", type=int, default=None, help="keep this many pairs (seeded shuffle, then the first N)")
    a("--resolution", type=int, default=None,
      help="training resolution, a multiple of 8 (default 512, SDXL and SD3 1024; video models: --height, --width)")
    a("--num_frames", type=int, default=None,
      help="video families: frames per clip, 4k + 1 (default: the pipeline's, Wan2.1 81, CogVideoX 49); both clips "
           "of a pair are read at the same frames")
    a("--height", type=int, default=None, help="video families: the clips' height (default: the pipeline's, 480)")
    a("--width", type=int, default=None,
      help="video families: the clips' width (default: the pipeline's, Wan2.1 832, CogVideoX 720)")
    a("--frame_window", default="random", choices=["random", "middle"],
      help="video families: which --num_frames consecutive frames of a clip pair are read: a window drawn per pair "
           "(random), or the middle one (what the latent cache stores)")
    a("--random_crop", action="store_true", help="random instead of center crop")
    a("--no_hflip", action="store_true", help="no random horizontal flips")
    a("--proportion_empty_prompts", type=float, default=0.2, help="probability that a caption is replaced by ''")
    a("--sdxl_true_time_ids", action="store_true",
      help="SDXL: each image's original size and crop as time ids (the reference fixes (res, res, 0, 0, res, res))")
    a("--dataloader_num_workers", type=int, default=0, help="dataloader worker processes")
    a("--latent_cache", default=None, metavar="DIR",
      help="train from a latent cache built by python -m sdpo.cache with the same flags: no VAE, no image decoding")
    # objective
    a("--train_method", default="diffusion-dpo", choices=["diffusion-dpo", "dspo", "dmpo", "sft"], help="the objective")
    a("--beta_dpo", type=float, default=5000.0, help="beta of the preference logit (5000 for diffusion, not 0.1)")
    a("--dmpo_alpha", type=float, default=0.0, help="DMPO's alpha: the target preference is 1 - alpha")
    a("--use_winner_preserving", action=argparse.BooleanOptionalAction, default=False,
      help="the Diffusion-SDPO safeguard on the loser's gradient (the launchers turn it on; --no-use_winner_preserving "
           "turns it off)")
    a("--winner_preserving_mu", type=float, default=0.0, help="safeguard strength in [0, 1]; larger is more conservative")
    a("--winner_preserving_per_sample", action="store_true", help="one safeguard scale per pair instead of per micro-batch")
    a("--timestep_weighting", default="none", choices=MODES, help="none, clip-mask (DPO-C&M) or importance")
    a("--timestep_range", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
      help="draw timesteps from [MIN, MAX) (default: all; 100 1000 for clip-mask and importance); for rectified "
           "flow, noise levels counted from the least noisy point of the scheduler's grid")
    # rectified flow (SD3): how sigmas are drawn, with the flags of diffusers' SD3 training examples
    a("--weighting_scheme", default="logit_normal", choices=["logit_normal", "mode", "none"],
      help="rectified flow: the density sigmas are drawn from (none: uniform); the loss is not reweighted")
    a("--logit_mean", type=float, default=0.0, help="logit_normal: the mean")
    a("--logit_std", type=float, default=1.0, help="logit_normal: the standard deviation")
    a("--mode_scale", type=float, default=1.29, help="mode: the scale")
    a("--is_mask_threshold", type=float, default=0.9, help="pairs whose importance weight is below this are masked")
    a("--is_clip_eps", type=float, default=0.2, help="importance weights are clamped to [1 - eps, 1 + eps]")
    a("--choice_model", default=None, type=choice_model, metavar="{" + ",".join(CHOICE_MODELS) + "}",
      help="AI feedback: a reward model picks each pair's winner instead of label_0 (as the reference; "
           "its names aes, hps, clip and pickscore work too)")
    a("--choice_model_source", action="append", default=[], metavar="METRIC.FIELD=VALUE",
      help="model source for the choice model (see eval.score --source); repeatable")
    # optimisation
    a("--train_batch_size", type=int, default=1, help="pairs per process per micro-batch")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--max_train_steps", type=int, default=2000, help="optimizer steps; 0: --num_train_epochs passes over the data")
    a("--num_train_epochs", type=int, default=100, help="used only when --max_train_steps is 0")
    a("--learning_rate", type=float, default=1e-8, help="learning rate (x batch x accumulation x processes with --scale_lr)")
    a("--scale_lr", action="store_true", help="lr x batch x accumulation x processes")
    a("--lr_scheduler", default="constant_with_warmup",
      choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
      help="diffusers' learning-rate schedule")
    a("--lr_warmup_steps", type=int, default=500, help="warmup, in optimizer steps")
    a("--use_adafactor", action=argparse.BooleanOptionalAction, default=None,
      help="Adafactor (default: on for SDXL and the video models)")
    a("--use_8bit_adam", action="store_true",
      help="bitsandbytes' 8-bit AdamW: the optimizer's two moments in 8 bits (block-wise quantised)")
    a("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    a("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    a("--adam_weight_decay", type=float, default=1e-2, help="weight decay (AdamW and Adafactor)")
    a("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    a("--max_grad_norm", type=float, default=1.0,
      help="gradient-norm clip, with AdamW and Adafactor alike (as the reference's launchers run); 0 turns it off")
    a("--loss_precision", default="reference", choices=LOSS_PRECISIONS,
      help="reference: the reference's bf16/fp16 casts (latents, noise, target and the reference UNet's losses in "
           "the weight dtype); fp32: latents, noise and every loss in fp32")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="gradient checkpointing in the policy UNet (default: on for SDXL and the video models)")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
      help="default: what accelerate launch was given (its --mixed_precision or `accelerate config`), else no. "
           "fp16 falls back to 'no' on CPU; bf16 runs on CPU under CPU autocast")
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    a("--compile", action="store_true",
      help="torch.compile the policy and reference UNets (for GPUs; on a CPU it is slower, see the README)")
    a("--host_memory", default="reuse", choices=["reuse", "release"],
      help="training on a CPU: reuse keeps what a step frees in the process for the next step (glibc serves "
           "large blocks from its heap and never trims it; measured on SD1.5: no page faults within a step, the "
           "same peak); release is glibc's default, which hands large blocks back and faults them in again every "
           "step (a third of an SD1.5 step on a CPU, see the README). No effect on a GPU or on the result")
    a("--seed", type=int, default=None,
      help="seed; process i is seeded with seed + i, as the reference (default: random, recorded in "
           "train_config.json and checkpoints)")
    # output
    a("--output_dir", default="sd-model-finetuned", help="checkpoints, logs and the trained UNet")
    a("--push_to_hub", action="store_true",
      help="upload the final folder (UNet or LoRA, train_config.json, model card, validation images) to the hub")
    a("--hub_model_id", default=None, help="the hub repository (default: the output folder's name under your account)")
    a("--hub_private_repo", action="store_true", help="create the hub repository as private")
    a("--logging_dir", default="logs", help="TensorBoard folder, under output_dir")
    a("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"], help="trackers to log to")
    a("--tracker_project_name", default="preference-training", help="the trackers' project name (TensorBoard subfolder)")
    a("--local_rank", type=int, default=-1, help="ignored: accelerate launch sets each process's rank")
    a("--checkpointing_steps", type=int, default=500, help="a checkpoint every N optimizer steps (0: none)")
    a("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    a("--resume_from_checkpoint", default="latest", help="'latest', a checkpoint folder, or '' to start afresh")
    a("--max_skipped_steps", type=int, default=10,
      help="stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped)")
    # held-out progress
    a("--validation_pairs", type=int, default=0,
      help="hold out this many pairs (from the training split, excluded from training; or from --validation_split) "
           "and score them at fixed timesteps with fixed noise every --validation_steps")
    a("--validation_split", default=None, help="take the validation pairs from this split instead")
    a("--validation_steps", type=int, default=100, help="validate every N optimizer steps (and before the first)")
    a("--validation_timesteps", type=int, default=5, help="fixed timesteps per validation pair, evenly spaced")
    a("--validation_prompts", nargs="*", default=[], help="prompts to sample at each validation, saved as PNG")
    a("--num_validation_images", type=int, default=1, help="images per validation prompt")
    a("--validation_sampling_steps", type=int, default=25, help="Euler steps for validation images (cfg 7.5)")
    # checks
    a("--dry_run", action="store_true",
      help="check the settings and the dataset, write train_config.json, and stop before loading any model")
    a("--check_only", action="store_true",
      help="check the settings, the paths, a checkpoint to resume and the dataset (columns, types, labels), write "
           "nothing (not even the output folder or a datasets cache), and exit (status 2 with a message if "
           "something is wrong); the launchers run this before accelerate launch. The process count is read "
           "from WORLD_SIZE (default 1)")
    args = p.parse_args(argv)

    # The family, from the pipeline's model_index.json (checked strictly, with --sdxl, in check_settings).
    family = families.resolve(args.pretrained_model_name_or_path, args.sdxl, strict=False, revision=args.revision,
                              cache_dir=args.cache_dir)
    args.model_family = family.name
    if family.video and args.resolution is not None:
        raise InputError(f"--resolution: {family.label} clips are sized with --height and --width")
    if args.resolution is None:
        args.resolution = family.resolution
    if family.video:  # the pipeline's clip size and length, where not given
        args.height = family.size[0] if args.height is None else args.height
        args.width = family.size[1] if args.width is None else args.width
        args.num_frames = family.num_frames if args.num_frames is None else args.num_frames
    for flag in ("use_adafactor", "gradient_checkpointing"):
        if getattr(args, flag) is None:
            setattr(args, flag, family.memory_savers)  # the reference forces both on for SDXL; here they can be off
    if args.max_train_steps == 0:
        args.max_train_steps = None
    if args.mixed_precision is None:  # as diffusers' examples: accelerate launch's setting (its config file)
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if args.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"ACCELERATE_MIXED_PRECISION {args.mixed_precision!r} (from accelerate launch): this "
                             f"project trains in no, fp16 or bf16; pass --mixed_precision")
    return args


def check_settings(args):
    """Reject settings that cannot work or make no sense, with one line that names the flag.
    Nothing is written: the output folders are checked, not made."""
    def check(ok, message):
        if not ok:
            raise InputError(message)

    # An empty value is a mistake, not "not given", except where '' is documented to mean none (no
    # --unet_init, no --ref_unet, a fresh start) or is a prompt (an unconditional validation image).
    no_empty_values(args, allowed=("unet_init", "ref_unet", "resume_from_checkpoint", "validation_prompts"))
    check(args.dataset_name, "--dataset_name is required: a hub id or a local copy of Pick-a-Pic-style pairs (the "
                             "reference's image-folder data, --train_data_dir without --dataset_name, is not supported)")
    try:
        check_mu(args.winner_preserving_mu)
    except ValueError as err:
        raise InputError(f"--{err}") from None
    # Counts and sizes.
    for flag, low in (("train_batch_size", 1), ("gradient_accumulation_steps", 1), ("num_train_epochs", 1),
                      ("checkpointing_steps", 0), ("lr_warmup_steps", 0), ("dataloader_num_workers", 0),
                      ("max_skipped_steps", 1), ("validation_pairs", 0), ("validation_steps", 0),
                      ("num_validation_images", 0), ("validation_timesteps", 1), ("validation_sampling_steps", 1)):
        check(getattr(args, flag) >= low, f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    for flag in ("max_train_samples", "checkpoints_total_limit"):
        value = getattr(args, flag)
        check(value is None or value >= 1, f"--{flag} must be >= 1, got {value}")
    check(args.max_train_steps is None or args.max_train_steps >= 1,
          f"--max_train_steps must be >= 0 (0: --num_train_epochs passes over the data), got {args.max_train_steps}")
    image_size(args.resolution, "--resolution")
    check(args.seed is None or 0 <= args.seed < 2**32, f"--seed must lie in [0, 2**32), got {args.seed}")
    for flag in ("beta_dpo", "learning_rate", "adam_weight_decay", "adam_epsilon"):
        check(math.isfinite(getattr(args, flag)), f"--{flag} must be a finite number, got {getattr(args, flag)}")
    # The objective.
    check(args.train_method == "sft" or args.beta_dpo > 0,
          f"--beta_dpo must be > 0, got {args.beta_dpo}: a negative beta prefers the losers and 0 removes the "
          f"preference signal")
    check(0.0 <= args.dmpo_alpha < 1.0, f"--dmpo_alpha must lie in [0, 1), got {args.dmpo_alpha}")
    check(0.0 <= args.proportion_empty_prompts <= 1.0, "--proportion_empty_prompts must lie in [0, 1]")
    check(0.0 <= args.is_clip_eps < 1.0, f"--is_clip_eps must lie in [0, 1), got {args.is_clip_eps}")
    check(args.is_mask_threshold >= 0, f"--is_mask_threshold must be >= 0, got {args.is_mask_threshold}")
    check(not (args.use_winner_preserving and args.train_method == "sft"),
          "--use_winner_preserving needs a loser branch; sft trains on winners only")
    check(not (args.choice_model and args.train_method == "sft"), "--choice_model needs pairs; sft trains on winners")
    check(not (args.ref_unet and args.train_method == "sft"), "--ref_unet needs a preference objective; sft has no reference")
    # LoRA and memory.
    check(args.lora_rank >= 1, f"--lora_rank must be >= 1, got {args.lora_rank}")
    check(args.lora_alpha is None or (math.isfinite(args.lora_alpha) and args.lora_alpha > 0),
          f"--lora_alpha must be > 0, got {args.lora_alpha}")
    check(0.0 <= args.lora_dropout < 1.0, f"--lora_dropout must lie in [0, 1), got {args.lora_dropout}")
    check(not (args.merge_lora and not args.use_lora), "--merge_lora needs --use_lora")
    check(not (args.use_8bit_adam and args.use_adafactor),
          "--use_8bit_adam and Adafactor exclude each other (SDXL and the video models use Adafactor by default: add "
          "--no-use_adafactor)")
    if args.use_8bit_adam:
        import_bitsandbytes()
    check(not (args.hub_model_id and not args.push_to_hub), "--hub_model_id needs --push_to_hub")
    check(not (args.hub_private_repo and not args.push_to_hub), "--hub_private_repo needs --push_to_hub")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate launch with an FSDP config
        check(not args.use_lora, "--use_lora with an FSDP accelerate config: the adapters are small, there is "
                                 "nothing to shard; train LoRA with a multi-GPU (DDP) config or on one GPU")
        check(not args.use_adafactor, "Adafactor with an FSDP accelerate config: transformers' Adafactor cannot update "
                                      "sharded (DTensor) parameters; add --no-use_adafactor (AdamW's state is sharded "
                                      "with the model)")
        check(not args.use_8bit_adam, "--use_8bit_adam with an FSDP accelerate config: bitsandbytes' 8-bit AdamW on "
                                      "sharded (DTensor) parameters is untested here; leave the flag out")
    if args.timestep_range is not None:
        lo, hi = args.timestep_range
        check(0 <= lo < hi, f"--timestep_range {lo} {hi}: needs 0 <= MIN < MAX (timesteps are drawn from [MIN, MAX))")
    # The optimizer.
    check(args.learning_rate >= 0, f"--learning_rate must be >= 0, got {args.learning_rate}")
    check(0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1, "--adam_beta1 and --adam_beta2 must lie in [0, 1)")
    check(args.adam_epsilon > 0, f"--adam_epsilon must be > 0, got {args.adam_epsilon}")
    check(args.adam_weight_decay >= 0, f"--adam_weight_decay must be >= 0, got {args.adam_weight_decay}")
    check(args.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (0 turns clipping off), got {args.max_grad_norm}")
    # Data.
    check(not (args.streaming and args.max_train_steps is None), "--streaming needs --max_train_steps")
    check(not (args.streaming and args.validation_pairs), "--validation_pairs needs a map-style dataset, not --streaming")
    check(not (args.sdxl_true_time_ids and not args.sdxl), "--sdxl_true_time_ids needs --sdxl")
    check(args.logit_std > 0, f"--logit_std must be > 0, got {args.logit_std}")
    if args.latent_cache:
        for flag, used in (("--random_crop", args.random_crop), ("--streaming", args.streaming),
                           ("--choice_model", args.choice_model), ("--validation_split", args.validation_split)):
            check(not used, f"--latent_cache cannot be combined with {flag}: train from the images for it")
    check(not (args.choice_model and args.streaming), "--choice_model scores every pair before training; it needs a "
                                                      "map-style dataset, not --streaming")
    check(args.image_column is None,
          "--image_column: preference pairs are read from the columns jpg_0 and jpg_1 (the reference ignores "
          "--image_column for pairs too); rename your dataset's image columns to jpg_0 and jpg_1")
    if args.choice_model:
        from eval.scorers import parse_sources

        parse_sources(args.choice_model_source, flag="--choice_model_source")
    if args.report_to in ("wandb",):
        import importlib.util

        check(importlib.util.find_spec("wandb") is not None,
              "--report_to wandb: wandb is not installed (pip install wandb, or --report_to tensorboard)")
    # Paths.
    family = models.check_base(args.pretrained_model_name_or_path, args.sdxl, revision=args.revision,
                               cache_dir=args.cache_dir)
    check(not (args.no_t5 and not family.optional_t5), f"--no_t5: {args.pretrained_model_name_or_path} is "
                                                       f"{family.article} {family.label} pipeline, which has no T5 encoder")
    check(args.resolution % family.size_multiple == 0,
          f"--resolution {args.resolution}: {family.label} takes sizes that are multiples of {family.size_multiple}")
    if family.video:
        for flag in ("height", "width"):
            value = getattr(args, flag)
            check(value > 0 and value % family.size_multiple == 0,
                  f"--{flag} {value}: {family.label} takes sizes that are multiples of {family.size_multiple}")
        check(not (args.latent_cache and args.frame_window != "middle"),
              "--latent_cache holds the middle window of each clip: add --frame_window middle")
        for flag, used in (("--random_crop", args.random_crop), ("--choice_model", args.choice_model),
                           ("--validation_prompts", args.validation_prompts and args.num_validation_images)):
            check(not used, f"{flag} is not supported for video models yet ({family.label}): leave it out (videos "
                            f"are sampled with eval.generate)")
    else:
        for flag in ("num_frames", "height", "width"):
            check(getattr(args, flag) is None, f"--{flag} is for video models; {args.pretrained_model_name_or_path} "
                                               f"is {family.article} {family.label} pipeline (images: --resolution)")
        check(args.frame_window == "random", f"--frame_window is for video models; {args.pretrained_model_name_or_path} "
                                             f"is {family.article} {family.label} pipeline")
    if not family.sigma_density:  # the flow-matching flags would be ignored without a word
        for flag, default in (("weighting_scheme", "logit_normal"), ("logit_mean", 0.0), ("logit_std", 1.0),
                              ("mode_scale", 1.29)):
            check(getattr(args, flag) == default, f"--{flag} applies to rectified flow (SD3); {family.label} draws "
                                                  f"timesteps uniformly (--timestep_range limits them)")
    for flag in ("pretrained_vae_model_name_or_path", "unet_init", "ref_unet"):
        value = getattr(args, flag)
        if value and value != "base" and not os.path.exists(value) and not models.HUB_ID.fullmatch(value):
            raise InputError(f"--{flag} {value!r}: not found (give a local path or a hub id)")
    for flag, folder in output_folders(args).items():
        check_output_dir(folder, flag, create=False)
    check(not (args.validation_split and args.validation_split == args.split),
          f"--validation_split {args.validation_split} is the training split: its pairs would be trained on; hold "
          f"pairs out with --validation_pairs alone, or name another split")
    name = args.pretrained_model_name_or_path.lower()
    if "turbo" in name or "refiner" in name:
        logger.warning("the reference switches to special timesteps for models whose name contains 'turbo' or "
                       "'refiner'; this project trains %s like any other pipeline", args.pretrained_model_name_or_path)


# ---- models ----------------------------------------------------------------------------------


def import_bitsandbytes():
    """bitsandbytes (its 8-bit AdamW runs on CUDA GPUs and, from 0.50, on CPUs), or one line saying
    why it cannot run here: not installed, or its library does not load on this machine."""
    try:  # (sdpo/__init__.py quiets its import-time warning about a 4-bit kernel)
        import bitsandbytes
    except Exception as err:  # ImportError, or its native library failing to load (OSError, RuntimeError)
        raise InputError(f"--use_8bit_adam: bitsandbytes cannot be used here ({type(err).__name__}: "
                         f"{first_line(err)}); pip install bitsandbytes, or leave the flag out for torch's AdamW") from None
    return bitsandbytes


def load_models(args):
    """Tokenizers, text encoders, VAE (none when a latent cache replaces it and no validation
    image needs decoding), the policy UNet, and a reference UNet of its own, or None where there is
    none: sft, or LoRA whose reference is the policy with its adapters off (models.reference_role)."""
    import copy

    base, family = args.pretrained_model_name_or_path, families.get(args.model_family)
    hub = dict(revision=args.revision, cache_dir=args.cache_dir)
    tokenizers, text_encoders = models.load_text_side(base, family, no_t5=args.no_t5, **hub)
    vae = None
    if not args.latent_cache or (args.validation_prompts and args.num_validation_images):
        vae = models.load_vae(base, args.pretrained_vae_model_name_or_path, family=family, **hub)
    unet = models.load_unet(models.policy_source(args), base, "--unet_init", family=family, **hub)
    ref_unet, role = None, models.reference_role(args)
    if role == "copy":  # the reference starts where the policy starts: copy, don't load twice
        ref_unet = copy.deepcopy(unet)
    elif role == "unet":
        ref_unet = models.load_unet(models.reference_source(args), base, "--ref_unet", family=family, **hub)
    return tokenizers, text_encoders, vae, unet, ref_unet


def build_optimizer(args, params, lr, device=None):
    """Adafactor as the reference sets it up, bitsandbytes' 8-bit AdamW, or AdamW (fused on a GPU:
    one kernel per step)."""
    if args.use_8bit_adam:
        bnb = import_bitsandbytes()
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                   weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=args.adam_weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False)
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=fused or None)


# ---- one micro-batch -------------------------------------------------------------------------


class MicroBatchLoss:
    """The loss of one micro-batch (and its statistics); everything it needs is fixed for the run.
    An optimizer step (train_step) accumulates it over --gradient_accumulation_steps micro-batches."""

    def __init__(self, args, accelerator, unet, reference, vae, prompt_encoder, noise, weight_dtype,
                 timesteps: tuple[int, int], latent_norm: tuple, device=None):
        self.args, self.accelerator = args, accelerator
        # reference: what predicts for the reference (sdpo.lora.FrozenReference or AdaptersOff), None for sft
        self.unet, self.reference, self.vae = unet, reference, vae
        self.prompt_encoder, self.weight_dtype = prompt_encoder, weight_dtype
        self.family = prompt_encoder.family
        self.noise = noise  # the noise process (sdpo.noise): DDPM or rectified flow
        self.t_lo, self.t_hi = timesteps  # draw noise levels from [t_lo, t_hi)
        # The reference's numerics (kept as the default): under bf16 its latents, noise, noisy latents
        # and target stay in the weight dtype, its reference UNet runs in pure bf16 without autocast
        # (so does LoRA's: the frozen base is in the weight dtype and the adapters are off),
        # and its reference losses are computed and rounded in bf16. --loss_precision fp32 keeps all
        # of these in fp32 instead.
        self.reference_numerics = args.loss_precision == "reference"
        self.latent_dtype = weight_dtype if self.reference_numerics else torch.float32
        self.device = device or accelerator.device  # the benchmark counts FLOPs on the meta device
        self.latent_norm = latent_norm  # (scale, shift): numbers, or per-channel tensors (Wan2.1)
        self.denoiser_config = prompt_encoder.denoiser_config

    def posterior(self, batch: PairBatch):
        """The VAE's posterior (mean, std) over the kB latents of a batch, winners first: encoded
        from the pixels, or read from the latent cache (no VAE)."""
        def winners_first(x):  # (B, k, ...) -> (kB, ...)
            return x.to(self.device, non_blocking=True).transpose(0, 1).reshape(-1, *x.shape[2:])

        if batch.latent_mean is not None:
            return winners_first(batch.latent_mean), winners_first(batch.latent_std)
        with torch.no_grad():
            dist = self.vae.encode(self.family.vae_input(winners_first(batch.pixels)).to(self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def sample_latents(self, mean, std):
        """What `latent_dist.sample()` draws (the same call on the same random stream), scaled."""
        sample = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return self.scale_latents(sample)

    def scale_latents(self, latents):
        # Contiguous whatever the VAE's output layout, so that the denoiser sees the same memory
        # layout (and so computes the same bits) from the images and from the latent cache.
        latents = latents.to(self.latent_dtype)
        return self.family.normalize(latents, *self.latent_norm).contiguous()

    def predict(self, latents, noise, t, batch: PairBatch, with_grad=True):
        """(model_pred, ref_pred or None, target) for a batch's kB latents, noise and grid indices t."""
        args, device = self.args, self.device
        k = latents.shape[0] // len(batch)
        noisy = self.noise.add_noise(latents, noise, t)
        target = self.noise.target(latents, noise, t)
        # The caption is encoded once and shared by both branches, the policy and the reference.
        cond = self.prompt_encoder(batch.captions, device, self.weight_dtype, ids=batch.caption_ids).repeat(k)
        if args.sdxl_true_time_ids:  # each image's own SDXL micro-conditioning
            cond = self.family.with_image_time_ids(cond, batch.time_ids)
        inputs = self.family.model_inputs(noisy, self.noise.model_timesteps(t), cond, self.denoiser_config)
        with torch.set_grad_enabled(with_grad), self.accelerator.autocast():
            model_pred = self.unet(**inputs).sample
        ref_pred = None
        if self.reference is not None and k == 2:
            ref_autocast = contextlib.nullcontext() if self.reference_numerics else self.accelerator.autocast()
            with torch.no_grad(), ref_autocast:
                ref_pred = self.reference(**inputs)
        return model_pred, ref_pred, target

    def loss_and_stats(self, model_pred, ref_pred, target, t, weighting: str, safeguard: bool):
        """The objective and its statistics (detached 0-dim tensors)."""
        args = self.args
        weights, stats = None, {}
        if weighting != "none":
            log_w = log_weights(model_pred, target, *self.noise.importance_terms(t),
                                torch.randn_like(model_pred, dtype=torch.float32))
            log_w = log_w if ref_pred is None else pair_log_weights(log_w)  # sft: one weight per image
            weights = pair_weights(log_w, weighting, args.is_mask_threshold, args.is_clip_eps)
            stats = {"kept_fraction": (weights > 0).float().mean(), "importance_weight": log_w.exp().mean()}
        if ref_pred is None:
            loss, loss_stats = sft_loss(model_pred, target, weights)
            return loss, {**loss_stats, **stats}
        scale = 1.0
        if safeguard:
            scale = winner_preserving_scale(model_pred, target, args.winner_preserving_mu,
                                            per_sample=args.winner_preserving_per_sample)
        loss, loss_stats = preference_loss(
            model_pred, ref_pred, target, method=args.train_method, beta=args.beta_dpo,
            dmpo_alpha=args.dmpo_alpha, dspo_form=self.family.dspo_form, loser_scale=scale, pair_weights=weights,
            upcast=not self.reference_numerics,
        )
        return loss, {**loss_stats, **stats}

    def __call__(self, batch: PairBatch):
        args = self.args
        B, k = len(batch), batch.images_per_pair  # k = 2 (winner, loser) or 1 (sft)
        latents = self.sample_latents(*self.posterior(batch))
        # One timestep and one noise per pair, shared by its winner and loser. The noise is drawn in
        # fp32 and then rounded to the latents' dtype, so both --loss_precision modes see the same draws.
        noise = torch.randn_like(latents[:B], dtype=torch.float32).to(latents.dtype)
        noise = noise.repeat(k, *([1] * (noise.ndim - 1)))
        t = self.noise.draw(B, self.t_lo, self.t_hi, device=self.device).repeat(k)
        model_pred, ref_pred, target = self.predict(latents, noise, t, batch)
        return self.loss_and_stats(model_pred, ref_pred, target, t, args.timestep_weighting,
                                   args.use_winner_preserving)


VALIDATION_NOISE_SEED = 1_000_003  # the held-out noise does not depend on --seed: runs stay comparable


class Validation:
    """Held-out pairs, scored at fixed timesteps with fixed noise, so that numbers are comparable
    across steps and runs: the same weights give the same numbers, bitwise.

    Each pair is scored at the same --validation_timesteps noise levels, evenly spaced over the run's
    range. Its VAE posterior sample and its noise come from a CPU generator seeded by the
    pair's index. Pairs are center-cropped, not flipped, and keep their captions. The processes
    share the pairs and sum their results.
    """

    METRICS = ("implicit_acc", "winner_minus_ref", "loser_minus_ref", "logit", "loss", "model_mse")

    def __init__(self, compute_loss: MicroBatchLoss, dataset, num_timesteps: int):
        self.compute_loss, self.dataset = compute_loss, dataset
        lo, hi = compute_loss.t_lo, compute_loss.t_hi
        levels = [lo + (2 * i + 1) * (hi - lo) // (2 * num_timesteps) for i in range(num_timesteps)]
        self.timesteps = [compute_loss.noise.index_at_level(level) for level in levels]  # grid indices

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        unet = self.compute_loss.unet
        unet.eval()  # no dropout (LoRA's): the same weights give the same numbers
        try:
            return self._score()
        finally:
            unet.train()

    def _score(self) -> dict[str, float]:
        from sdpo.data import collate_pairs

        micro, accelerator = self.compute_loss, self.compute_loss.accelerator
        device, batch_size = micro.device, micro.args.train_batch_size
        mine = list(range(accelerator.process_index, len(self.dataset), accelerator.num_processes))
        totals = torch.zeros(len(self.METRICS) + 1, dtype=torch.float64, device=device)
        batches = math.ceil(len(mine) / batch_size)
        if checkpoints.is_sharded(accelerator):  # in lockstep: each forward gathers shards from every process
            batches = math.ceil(math.ceil(len(self.dataset) / accelerator.num_processes) / batch_size)
        for start in range(0, batches * batch_size, batch_size):
            indices = mine[start : start + batch_size]
            counted = len(indices)  # a process out of pairs runs pair 0 again and counts nothing
            indices = indices or [0]
            batch = collate_pairs([self.dataset[(0, i)] for i in indices])
            B, k = len(batch), batch.images_per_pair
            mean, std = micro.posterior(batch)
            draws = [torch.Generator().manual_seed(VALIDATION_NOISE_SEED + i) for i in indices]
            shape = mean.shape[1:]
            # Per pair: its images' posterior noise, then one noise tensor per timestep.
            posterior_noise = torch.stack([torch.randn((k, *shape), generator=g) for g in draws], dim=1)
            latents = micro.scale_latents(mean + std * posterior_noise.reshape(B * k, *shape).to(device, mean.dtype))
            shape = latents.shape[1:]  # (CogVideoX's are frames first)
            for t_value in self.timesteps:
                noise = torch.stack([torch.randn(shape, generator=g) for g in draws]).to(device, latents.dtype)
                noise = noise.repeat(k, *([1] * (noise.ndim - 1)))
                t = torch.full((B * k,), t_value, device=device, dtype=torch.long)
                model_pred, ref_pred, target = micro.predict(latents, noise, t, batch, with_grad=False)
                loss, stats = micro.loss_and_stats(model_pred, ref_pred, target, t, "none", safeguard=False)
                stats["loss"] = loss
                values = [stats[m].double() * counted if m in stats
                          else torch.zeros((), device=device, dtype=torch.float64) for m in self.METRICS]
                totals += torch.stack([*values, torch.tensor(float(counted), device=device, dtype=torch.float64)])
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        count = totals[-1]
        has_reference = micro.reference is not None
        return {f"val_{m}": value / count for m, value in zip(self.METRICS, totals[:-1])
                if has_reference or m in ("loss", "model_mse")}


# ---- the recipe ------------------------------------------------------------------------------


class Settings(argparse.Namespace):
    """The run's settings: the flags with their defaults resolved (parse_args) and the seed chosen
    (run_seed). Made once, before anything is loaded; read everywhere, written nowhere."""

    def __init__(self, args: argparse.Namespace, **resolved):
        for key, value in {**vars(args), **resolved}.items():
            object.__setattr__(self, key, tuple(value) if isinstance(value, list) else value)

    def __setattr__(self, name, value):
        raise AttributeError(f"the settings are resolved once and then frozen: cannot set {name}")

    def __delattr__(self, name):
        raise AttributeError(f"the settings are resolved once and then frozen: cannot delete {name}")


def output_folders(args) -> dict[str, str]:
    """The folders a run writes to, by the flag that names them."""
    folders = {"--output_dir": args.output_dir}
    if args.report_to != "none":
        folders["--logging_dir"] = os.path.join(args.output_dir, args.logging_dir)
    if args.cache_dir:
        folders["--cache_dir"] = args.cache_dir
    return folders


def find_resume(args) -> tuple[str | None, dict | None]:
    """(the checkpoint to resume, its trainer state), or (None, None) for a fresh start. Refuses a
    damaged checkpoint, and a fresh start beside an earlier run's checkpoints."""
    resume_path = checkpoints.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if resume_path:
        state = checkpoints.read_state(resume_path)
        checkpoints.check_readable(resume_path)
        return resume_path, state
    found = checkpoints.list_checkpoints(args.output_dir)
    if not args.resume_from_checkpoint and found:
        # Starting afresh beside an earlier run's checkpoints would mix the two (pruning would
        # even delete the new ones, and a later resume would pick the old ones).
        raise InputError(f"--resume_from_checkpoint '': {args.output_dir} holds an earlier run's checkpoints "
                         f"(up to checkpoint-{found[-1][0]}); start afresh in another --output_dir, or resume")
    return None, None


def run_seed(args, resume_state: dict | None, num_processes: int, draw=None) -> int:
    """The run's seed: --seed, else the seed of the checkpoint to resume, else a fresh one from
    `draw` (train() draws it on the main process and sends it to the others, so that every process
    derives seed + its index from the same seed and the processes split the data)."""
    if args.seed is not None:
        seed = args.seed
    elif resume_state is not None:
        seed = int(resume_state["seed"])
    else:
        seed = draw() if draw else random.SystemRandom().randrange(2**31)  # the reference's default is unseeded
    if seed + num_processes > 2**32:
        raise InputError(f"--seed must be below 2**32 - {num_processes} (process i uses seed + i), got {seed}")
    return seed


def check_models(args, noise) -> tuple[int, int]:
    """The model files (without loading weights) and the settings that depend on the noise
    process; returns the range of noise levels [lo, hi) to draw from."""
    hub = dict(revision=args.revision, cache_dir=args.cache_dir)
    family = families.get(args.model_family)
    models.check_pipeline(args.pretrained_model_name_or_path, family, args.pretrained_vae_model_name_or_path,
                          no_t5=args.no_t5, **hub)
    for flag in ("unet_init", "ref_unet"):
        if getattr(args, flag):
            models.check_unet(getattr(args, flag), args.pretrained_model_name_or_path, f"--{flag}", family, **hub)
    if args.use_lora:
        lora.check_targets(models.base_unet_shapes(args.pretrained_model_name_or_path, family=family, **hub),
                           args.lora_target_modules)
    if family.video:
        vae_config = models.vae_config(args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path,
                                       family, **hub)
        denoiser = models.base_unet_shapes(args.pretrained_model_name_or_path, family=family, **hub)
        try:
            family.check_num_frames(args.num_frames, vae_config, denoiser.config)
        except ValueError as err:
            raise InputError(f"--num_frames {args.num_frames}: {err}") from None
    num_train_timesteps = noise.grid_size()
    try:
        lo, hi = timestep_range(args.timestep_weighting, args.timestep_range, num_train_timesteps)
    except ValueError as err:
        raise InputError(f"--timestep_range: {err}") from None
    if args.validation_pairs and args.validation_timesteps > hi - lo:
        raise InputError(f"--validation_timesteps {args.validation_timesteps}: the timestep range [{lo}, {hi}) holds "
                         f"only {hi - lo} timesteps")
    if args.validation_prompts and args.num_validation_images and args.validation_sampling_steps > num_train_timesteps:
        raise InputError(f"--validation_sampling_steps {args.validation_sampling_steps}: the scheduler has "
                         f"{num_train_timesteps} timesteps; sampling takes at most that many steps (25 is usual)")
    return lo, hi


def open_latent_cache(args, mixed_precision: str):
    """The latent cache of --latent_cache, checked against the run's settings (None without one)."""
    if not args.latent_cache:
        return None
    from sdpo.cache import LatentCache

    family = families.get(args.model_family)
    tokenizers = models.load_tokenizers(args.pretrained_model_name_or_path, family, no_t5=args.no_t5,
                                        revision=args.revision, cache_dir=args.cache_dir)
    vae_dtype = family.vae_dtype(models.DTYPES[mixed_precision], bool(args.pretrained_vae_model_name_or_path))
    return LatentCache(args.latent_cache, args, vae_dtype, tokenizers)


def load_noise(args):
    """The family's noise process, on the base pipeline's training scheduler."""
    family = families.get(args.model_family)
    config = models.scheduler_config(args.pretrained_model_name_or_path, revision=args.revision,
                                     cache_dir=args.cache_dir)
    try:
        return family.noise_process(family.training_scheduler(config), args)
    except ValueError as err:  # a prediction type we do not train
        raise InputError(f"--pretrained_model_name_or_path: its scheduler: {err}") from None


@dataclass
class Inputs:
    """Everything a run derives from its settings before any model loads."""

    config: dict
    noise: object  # the noise process (sdpo.noise)
    timesteps: tuple[int, int]
    dataloader: object
    num_pairs: int | None
    validation_pairs: object
    start_step: int
    total_steps: int
    resume_path: str | None
    latent_norm: tuple | None = None  # the VAE's (scale, shift), read from the latent cache when there is one


def prepare_inputs(args: Settings, num_processes: int, rank: int, mixed_precision: str, resume_path: str | None,
                   resume_state: dict | None) -> Inputs:
    """The checks that need no model (the checkpoint's settings, the model files, the noise
    schedule and timestep range), and this process's dataloader and held-out pairs."""
    noise = load_noise(args)
    timesteps = check_models(args, noise)
    start_step = resume_state["global_step"] if resume_state else 0
    cache = open_latent_cache(args, mixed_precision)
    dataloader, num_pairs, validation_pairs = build_dataloader(
        args, rank=rank, world_size=num_processes, start_micro_batch=start_step * args.gradient_accumulation_steps,
        cache=cache)
    total_steps = args.max_train_steps or args.num_train_epochs * math.ceil(
        len(dataloader) / args.gradient_accumulation_steps)
    config = checkpoints.run_config(args, num_processes, mixed_precision, timesteps, resume_path, total_steps)
    checkpoints.check_resumable(resume_path, resume_state, config)
    return Inputs(config, noise, timesteps, dataloader, num_pairs, validation_pairs, start_step, total_steps,
                  resume_path, cache.latent_norm if cache else None)


def check_only(args, mixed_precision: str) -> None:
    """--check_only: everything prepare_inputs checks, for WORLD_SIZE processes, writing nothing:
    no output folder, no dataset cache (the data is read from its files, see sdpo.data.check_data)."""
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    resume_path, resume_state = find_resume(args)
    settings = Settings(args, seed=run_seed(args, resume_state, num_processes))
    timesteps = check_models(settings, load_noise(settings))
    check_data(settings, num_processes, open_latent_cache(settings, mixed_precision))
    config = checkpoints.run_config(settings, num_processes, mixed_precision, timesteps, resume_path, None)
    checkpoints.check_resumable(resume_path, resume_state, config)


def mixed_precision_for(args) -> str:
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        logger.warning("no GPU: --mixed_precision fp16 falls back to 'no'")
        return "no"
    return args.mixed_precision


@dataclass
class Run:
    """A run ready to train: its inputs, the accelerator, the models, the optimizer and the loss."""

    args: Settings
    inputs: Inputs
    accelerator: object
    weight_dtype: torch.dtype
    unet: object
    reference: object  # sdpo.lora.FrozenReference or AdaptersOff; None for sft
    vae: object
    prompt_encoder: PromptEncoder
    optimizer: object
    lr_scheduler: object
    compute_loss: MicroBatchLoss
    validation: Validation | None


def compile_models(models_: list, device) -> None:
    """torch.compile the policy UNet and the reference in place (the modules and their state dicts
    keep their names; the reference compiles what it calls).

    On a CPU, inductor vectorises its kernels for the widest instruction set that a build-and-load
    probe accepts, and the vector width changes the arithmetic (reductions add in another order):
    on the tiny test model, AVX2 kernels move the second step's loss by 4e-4 relative, scalar ones
    move even the first loss off log 2. The probe runs a compiler and a child process with a
    timeout, so on a loaded machine it can fail and silently narrow the width, and the training
    result would depend on the machine's load. The width is therefore taken from the CPU's flags
    alone (what ATen's eager kernels also go by), without the probe. The cost: on a CPU whose flags
    claim an instruction set that the installed compiler cannot build, --compile now stops with the
    compiler's error instead of quietly using narrower kernels. The setting holds for the process."""
    if device.type == "cpu":
        import torch._inductor.config as inductor

        inductor.cpp.vec_isa_ok = True
    for model in models_:
        model.compile()


def setup(args: Settings, accelerator, inputs: Inputs, parts=None, device=None) -> Run:
    """Load the models (or take `parts`, as load_models returns them: the benchmark builds them from
    configs), build the optimizer and the lr schedule, restore a checkpoint. `device` overrides
    the accelerator's (the benchmark counts FLOPs on the meta device)."""
    from diffusers.optimization import get_scheduler

    device = device or accelerator.device
    family = families.get(args.model_family)
    weight_dtype = models.DTYPES[accelerator.mixed_precision]
    # Models: the policy trains in fp32 under autocast; everything frozen runs in the weight dtype
    # (with LoRA the UNet itself, all but its fp32 adapters).
    tokenizers, text_encoders, vae, unet, ref_unet = parts or load_models(args)
    for frozen in [*text_encoders, vae, ref_unet]:
        if frozen is not None:
            models.cast_frozen(frozen.requires_grad_(False).eval(), weight_dtype).to(device)
    if args.use_lora:
        models.cast_frozen(unet, weight_dtype).to(device)
        lora.add_adapters(unet, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    if ref_unet is not None:
        reference = lora.FrozenReference(ref_unet)
    elif models.reference_role(args) == "adapters-off":
        reference = lora.AdaptersOff(unet)
    else:
        reference = None
    if vae is not None and family.vae_dtype(weight_dtype, bool(args.pretrained_vae_model_name_or_path)) != weight_dtype:
        vae.to(dtype=torch.float32)  # SDXL's original VAE overflows in fp16 (NaN latents)
        logger.warning("fp16 with SDXL's own VAE: encoding in fp32; the fp16-fix VAE "
                       "(--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix) is faster")
    unet.to(device).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda":  # NHWC convolutions are faster on tensor cores
        for model in (unet, ref_unet, vae):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    prompt_encoder = PromptEncoder(family, tokenizers, text_encoders, args.resolution, unet.config)

    trainable = lora.trainable_parameters(unet)
    logger.info("trainable parameters: %s of %s%s", f"{sum(p.numel() for p in trainable):,}",
                f"{sum(p.numel() for p in unet.parameters()):,}", " (LoRA adapters)" if args.use_lora else "")
    optimizer = build_optimizer(args, trainable, inputs.config["derived"]["effective_lr"], device)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if args.compile:
        compile_models([unet, *([reference] if reference else [])], device)
    # The reference steps its prepared scheduler once per optimizer step per process, with warmup
    # and length multiplied by the process count: the warmup counts optimizer steps. So do we.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=inputs.total_steps)
    if inputs.resume_path:
        checkpoints.load_checkpoint(inputs.resume_path, accelerator, unet, optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d", inputs.resume_path, inputs.start_step)
    latent_norm = inputs.latent_norm or family.latent_norm(vae.config)
    compute_loss = MicroBatchLoss(args, accelerator, unet, reference, vae, prompt_encoder, inputs.noise,
                                  weight_dtype, inputs.timesteps, latent_norm, device)
    validation = None
    if inputs.validation_pairs is not None:
        validation = Validation(compute_loss, inputs.validation_pairs, args.validation_timesteps)
    return Run(args, inputs, accelerator, weight_dtype, unet, reference, vae, prompt_encoder, optimizer,
               lr_scheduler, compute_loss, validation)


def validate_now(run: Run, step: int, metrics: MetricsFile) -> None:
    """Held-out metrics and validation images at `step`, logged to the trackers and metrics.jsonl.
    It runs on a copy of the random state, so a run draws the same noise with or without it."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        _validate(run, step, metrics)


def _validate(run: Run, step: int, metrics: MetricsFile) -> None:
    args, accelerator = run.args, run.accelerator
    if run.validation is not None:
        values = run.validation()
        accelerator.log(values, step=step)
        metrics.append(step, values)
        logger.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    if args.validation_prompts and args.num_validation_images:
        save_validation_images(run, step)


def save_validation_images(run: Run, step: int) -> None:
    """Sample the validation prompts with the policy and save them as PNG and to the trackers."""
    from sdpo.sampling import sample

    args, accelerator = run.args, run.accelerator
    # Sharded, every process runs the UNet (its forward gathers the shards); the main process saves.
    if not accelerator.is_main_process and not checkpoints.is_sharded(accelerator):
        return
    unet = accelerator.unwrap_model(run.unet)
    family = run.prompt_encoder.family
    scheduler = family.sampling_scheduler(run.inputs.noise.scheduler.config)
    # The pipeline's text lengths (SD3: 256 T5 tokens), over the run's encoders.
    prompts = PromptEncoder(family, run.prompt_encoder.tokenizers, run.prompt_encoder.text_encoders, args.resolution,
                            unet.config, sampling=True)
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    main = accelerator.is_main_process
    if main:
        os.makedirs(folder, exist_ok=True)
    images = []
    unet.eval()
    with accelerator.autocast():
        for p, prompt in enumerate(args.validation_prompts):
            for i in range(args.num_validation_images):
                image = sample(unet, run.vae, prompts, scheduler, [prompt], args.resolution, args.resolution,
                               args.validation_sampling_steps, family.sampling_cfg, args.seed + i, torch.float32)[0]
                if main:
                    image.save(os.path.join(folder, f"{p}-{i}.png"))
                images.append(image)
    unet.train()
    if not main:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.log_images({"validation": np.stack([np.asarray(im) for im in images])}, step,
                               dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": images}, step)


def train_step(run: Run, batches) -> tuple[dict[str, float], str]:
    """One optimizer step: accumulate the micro-batches' gradients, measure and clip their norm,
    and step unless the loss or the norm is not finite. Returns the step's numbers (averaged over
    micro-batches and processes) and what happened: "stepped"; "skipped" (a non-finite loss or
    gradient: no update); or, under fp16, "overflow" (the gradient scaler's scale was too large
    for these gradients: no update, a smaller scale, an ordinary event while it settles)."""
    args, accelerator, unet, optimizer = run.args, run.accelerator, run.unet, run.optimizer
    accum = args.gradient_accumulation_steps
    step_stats = []
    for micro in range(accum):
        batch = next_batch(batches)
        # Gradients are all-reduced only on the last micro-batch of a step.
        sync = accelerator.no_sync(unet) if micro < accum - 1 else contextlib.nullcontext()
        with sync:
            loss, stats = run.compute_loss(batch)
            accelerator.backward(loss / accum)
        step_stats.append({"loss": loss.detach(), **stats})
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf  # inf: measure the norm, clip nothing
    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), max_norm)  # the norm before clipping
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()

    # The step's one host sync: the micro-batch means, averaged over processes, with the gradient
    # norm. Every process sees the same numbers, so all skip a non-finite step alike.
    keys = list(step_stats[0].keys())
    means = [torch.stack([s[k].float() for s in step_stats]).mean() for k in keys]
    if grad_norm is not None:
        keys.append("grad_norm")
        means.append(grad_norm.float().reshape(()))
    values = dict(zip(keys, accelerator.reduce(torch.stack(means), reduction="mean").tolist()))
    loss_finite = math.isfinite(values["loss"])
    scaler = getattr(accelerator, "scaler", None)
    if loss_finite and math.isfinite(values.get("grad_norm", 0.0)):
        optimizer.step()
        run.lr_scheduler.step()
        status = "stepped"
    else:
        if scaler is not None:  # it unscaled these gradients: update() lowers its scale after an overflow
            scaler.update()  # and resets its per-step state, so the next step can unscale again
        status = "overflow" if scaler is not None and loss_finite else "skipped"
    optimizer.zero_grad(set_to_none=True)
    return values, status


def fit(run: Run) -> dict:
    """The training loop: accumulate, skip non-finite steps, clip, step, log, validate, checkpoint."""
    from tqdm.auto import tqdm

    args, accelerator, inputs = run.args, run.accelerator, run.inputs
    unet, optimizer, lr_scheduler = run.unet, run.optimizer, run.lr_scheduler
    accum, start_step = args.gradient_accumulation_steps, inputs.start_step
    derived = inputs.config["derived"]
    total = inputs.total_steps
    logger.info("%s on %s: %d pairs per step (%d per process x %d accumulation x %d processes), %d steps, lr %g, "
                "gradient clipping: %s, loss precision: %s", args.train_method, families.get(args.model_family).label,
                derived["pairs_per_step"], args.train_batch_size, accum, derived["num_processes"],
                total, derived["effective_lr"], derived["gradient_clipping"], args.loss_precision)

    metrics = MetricsFile(os.path.join(args.output_dir, "metrics.jsonl"), start_step, accelerator.is_main_process)
    if start_step == 0:
        validate_now(run, 0, metrics)
    batches = iter(inputs.dataloader)
    progress = tqdm(range(start_step, total), initial=start_step, total=total,
                    disable=not accelerator.is_local_main_process, desc="steps")
    run_state = {"seed": args.seed, "train_method": args.train_method, "sdxl": args.sdxl,
                 "settings": checkpoints.result_settings(inputs.config)}
    logs, skipped_in_a_row, counts = {}, 0, {"stepped": 0, "skipped": 0, "overflow": 0}
    try:
        for step in range(start_step, total):
            started = time.perf_counter()
            values, status = train_step(run, batches)
            counts[status] += 1
            skipped_in_a_row = skipped_in_a_row + 1 if status == "skipped" else 0
            if status == "skipped":
                logger.warning("step %d skipped: loss %s, gradient norm %s (%d in a row, %d in all)", step + 1,
                               values["loss"], values.get("grad_norm"), skipped_in_a_row, counts["skipped"])
            if skipped_in_a_row >= args.max_skipped_steps:
                raise RunStopped(
                    f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (the last at step "
                    f"{step + 1}); the run stops (--max_skipped_steps {args.max_skipped_steps}). Lower the learning "
                    f"rate or use bf16; the last checkpoint was written before the trouble")

            logs = dict(values, skipped_steps=float(counts["skipped"]), overflow_steps=float(counts["overflow"]),
                        lr=lr_scheduler.get_last_lr()[0], step_seconds=time.perf_counter() - started)
            accelerator.log(logs, step=step + 1)
            metrics.append(step + 1, logs)  # the same numbers as JSON lines, for scripts and plots
            progress.update(1)
            progress.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "implicit_acc", "lr") if k in logs})

            last = step + 1 == total
            if (args.validation_steps and (step + 1) % args.validation_steps == 0) or last:
                validate_now(run, step + 1, metrics)
            if args.checkpointing_steps and (step + 1) % args.checkpointing_steps == 0:
                check_finite_weights(run, step + 1)
                path = checkpoints.save_checkpoint(accelerator, args.output_dir, step + 1, unet, optimizer, lr_scheduler,
                                                   run_state, args.checkpoints_total_limit)
                logger.info("saved %s", path)
    finally:
        progress.close()  # so that a message that stops the run starts on a line of its own
    if counts["skipped"] and not counts["stepped"]:
        raise RunStopped(f"every one of the {counts['skipped']} steps had a non-finite loss or gradient: no update "
                         f"was made, and nothing is saved")
    return logs


def check_finite_weights(run: Run, step: int) -> None:
    """A checkpoint or a final model is never written from non-finite weights."""
    if not checkpoints.weights_are_finite(run.accelerator.unwrap_model(run.unet), run.accelerator):
        raise RunStopped(f"the weights are not finite after step {step}: nothing was saved (the last checkpoint "
                         f"holds finite weights); lower the learning rate")


def save_final(run: Run) -> None:
    """The trained UNet (safetensors) or LoRA adapters (diffusers' LoRA format, and with --merge_lora
    the merged UNet too) and the model card, each replacing an earlier final save atomically."""
    args, accelerator = run.args, run.accelerator
    check_finite_weights(run, run.inputs.total_steps)
    accelerator.wait_for_everyone()
    sharded = checkpoints.is_sharded(accelerator)
    folder = families.get(args.model_family).denoiser_folder
    whole = checkpoints.full_state_dict(run.unet) if sharded else None  # gathered from every process's shards
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.unet)
        if args.use_lora:
            tmp = os.path.join(args.output_dir, "lora.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            written = lora.save_diffusers_lora(model, tmp, families.get(args.model_family))
            os.replace(written, os.path.join(args.output_dir, lora.LORA_WEIGHTS))
            os.rmdir(tmp)
            logger.info("saved the LoRA adapters to %s", os.path.join(args.output_dir, lora.LORA_WEIGHTS))
            if args.merge_lora:
                save_unet_atomic(merged_unet(args, model), args.output_dir, folder=folder)
            elif os.path.exists(os.path.join(args.output_dir, folder)):  # an earlier --merge_lora save's: stale now
                checkpoints.remove_tree(os.path.join(args.output_dir, folder))
        else:
            save_unet_atomic(model, args.output_dir, whole, folder)
        images = hub.validation_images(args.output_dir, run.inputs.total_steps, args.validation_prompts,
                                       args.num_validation_images)
        checkpoints.write_model_card(run.inputs.config, run.inputs.total_steps, run.inputs.num_pairs,
                                     os.path.join(args.output_dir, "README.md"), images)
        if args.push_to_hub:
            name = hub.push(args.output_dir, args.hub_model_id, args.hub_private_repo,
                            hub.upload_files(args.output_dir, images, args.use_lora, args.merge_lora, folder))
            logger.info("uploaded %s to the hub as %s", args.output_dir, name)


def merged_unet(args, trained):
    """The trained adapters merged into a fresh fp32 copy of the UNet they were trained on (the
    run's own base is in the weight dtype: merging there would round the base weights to it)."""
    base = models.load_unet(models.policy_source(args), args.pretrained_model_name_or_path, "--unet_init",
                            family=families.get(args.model_family), revision=args.revision, cache_dir=args.cache_dir)
    lora.add_adapters(base, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    lora.load_adapter_state(base, lora.adapter_state(trained), "the trained adapters")
    return lora.merged(base)


def save_unet_atomic(model, output_dir: str, state: dict | None = None, folder: str = "unet") -> None:
    """output_dir/unet/ (the family's folder: transformer/ for SD3; diffusers layout, safetensors),
    written beside and renamed into place; `state`: the whole state dict of a sharded model (its
    parameters here are shards)."""
    tmp = os.path.join(output_dir, f"{folder}.tmp")
    if state is None:
        model.save_pretrained(tmp)
    else:  # the layout save_pretrained writes: config.json and one safetensors file
        from safetensors.torch import save_file

        shutil.rmtree(tmp, ignore_errors=True)
        model.save_config(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
    final = os.path.join(output_dir, folder)
    if os.path.exists(final):
        checkpoints.remove_tree(final)
    os.replace(tmp, final)
    logger.info("saved the trained model to %s", final)


def quiet_libraries() -> None:
    """Library loggers at WARNING (sdpo.models drops diffusers' warning about an empty list)."""
    for name in ("diffusers", "transformers", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_accelerator(args, mixed_precision: str, cpu: bool = False, device_placement: bool = True):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=mixed_precision, log_with=None if args.report_to == "none" else args.report_to, cpu=cpu,
        device_placement=device_placement,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )


def train(args):
    """The recipe: check the settings, resolve them, load the data and the models, fit, save."""
    from accelerate.utils import broadcast_object_list, gather_object, set_seed

    check_settings(args)
    mixed_precision = mixed_precision_for(args)
    if args.check_only:
        check_only(args, mixed_precision)
        print(f"checked: the settings, paths and data of {args.output_dir} are usable")
        return {}
    accelerator = make_accelerator(args, mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    quiet_libraries()
    reused = accelerator.device.type == "cpu" and args.host_memory == "reuse" and host_memory.keep_freed_memory()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for flag, folder in output_folders(args).items():  # every process (a node-local --cache_dir, say)
        check_output_dir(folder, flag)
    if accelerator.is_main_process:
        for name in checkpoints.clean_output_dir(args.output_dir):
            logger.warning("removed %s, left by a killed run", os.path.join(args.output_dir, name))
    accelerator.wait_for_everyone()

    def draw_on_main():
        drawn = [random.SystemRandom().randrange(2**31)]  # the reference's default is unseeded
        return broadcast_object_list(drawn)[0]

    resume_path, resume_state = find_resume(args)
    settings = Settings(args, seed=run_seed(args, resume_state, accelerator.num_processes, draw_on_main))
    # The settings and the data are checked before any model loads.
    inputs = prepare_inputs(settings, accelerator.num_processes, accelerator.process_index, accelerator.mixed_precision,
                            resume_path, resume_state)
    inputs.config["derived"]["process_seeds"] = gather_object([settings.seed + accelerator.process_index])
    inputs.config["derived"]["host_memory_reused"] = bool(reused)
    if accelerator.is_main_process:
        write_json_atomic(inputs.config, os.path.join(settings.output_dir, CONFIG_FILE))
    if settings.dry_run:
        logger.info("dry run: the settings and the data check out; wrote %s",
                    os.path.join(settings.output_dir, CONFIG_FILE))
        accelerator.end_training()
        return {}
    if settings.choice_model:
        parts = [(settings.split, inputs.dataloader.dataset)]
        if inputs.validation_pairs is not None:
            parts.append((settings.validation_split or settings.split, inputs.validation_pairs))
        choose_winners(settings, accelerator, parts)
    set_seed(settings.seed + accelerator.process_index)  # as the reference: each process its own stream
    run = setup(settings, accelerator, inputs)
    if accelerator.is_main_process and accelerator.log_with:
        flat = {k: v for k, v in {**inputs.config, **inputs.config["derived"]}.items()
                if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(settings.tracker_project_name, flat)
    logs = fit(run)
    save_final(run)
    accelerator.end_training()
    return logs


def stop_with_parent() -> None:
    """Under a launcher (accelerate launch, torchrun), end with it: if the launcher process is
    killed, Linux sends this process SIGTERM instead of leaving it running as an orphan."""
    import ctypes
    import signal

    launched = "LOCAL_RANK" in os.environ or any(k.startswith("ACCELERATE_") for k in os.environ)
    if not launched or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):  # (the launcher may be PID 1 in a container: no check of getppid)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@reports_input_errors
def main(argv=None):
    if argv is None:
        stop_with_parent()
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
