"""Preference training of Stable Diffusion 1.5 / SDXL UNets: Diffusion-DPO, DSPO, DMPO or SFT,
each with the optional winner-preserving safeguard of Diffusion-SDPO and timestep weighting.

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
import json
import logging
import math
import os
import random
import sys
import time

import torch

from sdpo import checkpoints, models
from sdpo.conditioning import PromptEncoder
from sdpo.data import build_dataloader, order_by_scores
from sdpo.errors import InputError, reports_input_errors
from sdpo.losses import check_mu, preference_loss, sft_loss, winner_preserving_scale
from sdpo.timesteps import MODES, log_importance_weights, pair_log_weights, pair_weights, timestep_range

logger = logging.getLogger("train")

CONFIG_FILE = "train_config.json"
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # models
    a("--pretrained_model_name_or_path", required=True, help="base pipeline: hub id or local folder")
    a("--pretrained_vae_model_name_or_path", default=None, help="a separate VAE (SDXL: madebyollin/sdxl-vae-fp16-fix)")
    a("--revision", default=None, help="revision of the base pipeline on the hub")
    a("--sdxl", action="store_true", help="the base is an SDXL pipeline (two text encoders)")
    a("--unet_init", default="",
      help="initialise the policy and the reference UNet from this UNet (folder, .safetensors or .pth), as the reference")
    a("--ref_unet", default="", metavar="PATH|base",
      help="a different reference UNet: 'base' (the base pipeline's) or a UNet path (default: --unet_init, else base)")
    a("--cache_dir", default=None, help="where downloaded models and datasets are stored (as datasets/diffusers' cache_dir)")
    # data
    a("--dataset_name", default=None, help="hub id, or a local folder with data/<split>-*.parquet, or one parquet file")
    a("--dataset_revision", default=None, help="revision of the dataset on the hub")
    a("--dataset_config_name", default=None, help="configuration of a hub dataset (load_dataset's second argument)")
    a("--train_data_dir", default=None,
      help="a subfolder of the dataset to read (load_dataset's data_dir; for a local folder, a subfolder of it)")
    a("--caption_column", default="caption", help="the dataset's caption column")
    a("--image_column", default=None, help=argparse.SUPPRESS)  # refused in validate(): pairs are jpg_0 and jpg_1
    a("--split", default="train", help="dataset split (only 'train' is shuffled, as in the reference)")
    a("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    a("--max_train_samples", type=int, default=None, help="keep this many pairs (seeded shuffle, then the first N)")
    a("--resolution", type=int, default=None, help="training resolution (default 512, SDXL 1024)")
    a("--random_crop", action="store_true", help="random instead of center crop")
    a("--no_hflip", action="store_true", help="no random horizontal flips")
    a("--proportion_empty_prompts", type=float, default=0.2, help="probability that a caption is replaced by ''")
    a("--sdxl_true_time_ids", action="store_true",
      help="SDXL: each image's original size and crop as time ids (the reference fixes (res, res, 0, 0, res, res))")
    a("--dataloader_num_workers", type=int, default=0, help="dataloader worker processes")
    # objective
    a("--train_method", default="diffusion-dpo", choices=["diffusion-dpo", "dspo", "dmpo", "sft"])
    a("--beta_dpo", type=float, default=5000.0, help="beta of the preference logit (5000 for diffusion, not 0.1)")
    a("--dmpo_alpha", type=float, default=0.0, help="DMPO's alpha: the target preference is 1 - alpha")
    a("--use_winner_preserving", action="store_true", help="the Diffusion-SDPO safeguard on the loser's gradient")
    a("--winner_preserving_mu", type=float, default=0.0, help="safeguard strength in [0, 1]; larger is more conservative")
    a("--winner_preserving_per_sample", action="store_true", help="one safeguard scale per pair instead of per micro-batch")
    a("--timestep_weighting", default="none", choices=MODES, help="none, clip-mask (DPO-C&M) or importance")
    a("--timestep_range", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
      help="draw timesteps from [MIN, MAX) (default: all; 100 1000 for clip-mask and importance)")
    a("--is_mask_threshold", type=float, default=0.9, help="pairs whose importance weight is below this are masked")
    a("--is_clip_eps", type=float, default=0.2, help="importance weights are clamped to [1 - eps, 1 + eps]")
    a("--choice_model", default=None, type=choice_model, metavar="{" + ",".join(CHOICE_MODELS) + "}",
      help="AI feedback: a reward model picks each pair's winner instead of label_0 (as the reference; "
           "its names aes, hps, clip and pickscore work too)")
    a("--choice_model_source", action="append", default=[], metavar="METRIC.FIELD=VALUE",
      help="model source for the choice model (see eval.score --source); repeatable")
    # optimisation
    a("--train_batch_size", type=int, default=1, help="pairs per process per micro-batch")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=2000, help="optimizer steps; 0: --num_train_epochs passes over the data")
    a("--num_train_epochs", type=int, default=100, help="used only when --max_train_steps is 0")
    a("--learning_rate", type=float, default=1e-8)
    a("--scale_lr", action="store_true", help="lr x batch x accumulation x processes")
    a("--lr_scheduler", default="constant_with_warmup",
      help="linear, cosine, cosine_with_restarts, polynomial, constant or constant_with_warmup")
    a("--lr_warmup_steps", type=int, default=500, help="warmup, in optimizer steps")
    a("--use_adafactor", action=argparse.BooleanOptionalAction, default=None, help="Adafactor (default: on for SDXL)")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0,
      help="gradient-norm clip, with AdamW and Adafactor alike (as the reference's launchers run); 0 turns it off")
    a("--loss_precision", default="reference", choices=LOSS_PRECISIONS,
      help="reference: the reference's bf16/fp16 casts (latents, noise, target and the reference UNet's losses in "
           "the weight dtype); fp32: latents, noise and every loss in fp32")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="gradient checkpointing in the policy UNet (default: on for SDXL)")
    a("--mixed_precision", default="fp16", choices=["no", "fp16", "bf16"],
      help="fp16 falls back to 'no' on CPU; bf16 runs on CPU under CPU autocast")
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    a("--seed", type=int, default=None,
      help="seed; process i is seeded with seed + i, as the reference (default: random, recorded in "
           "train_config.json and checkpoints)")
    # output
    a("--output_dir", default="sd-model-finetuned")
    a("--logging_dir", default="logs", help="TensorBoard folder, under output_dir")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    a("--tracker_project_name", default="preference-training", help="the trackers' project name (TensorBoard subfolder)")
    a("--local_rank", type=int, default=-1, help="ignored: accelerate launch sets each process's rank")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    a("--resume_from_checkpoint", default="latest", help="'latest', a checkpoint folder, or '' to start afresh")
    a("--dry_run", action="store_true",
      help="check the settings and the dataset, write train_config.json, and stop before loading any model")
    args = p.parse_args(argv)

    if args.resolution is None:
        args.resolution = 1024 if args.sdxl else 512
    for flag in ("use_adafactor", "gradient_checkpointing"):
        if getattr(args, flag) is None:
            setattr(args, flag, args.sdxl)  # the reference forces both on for SDXL; here they can be turned off
    if args.max_train_steps == 0:
        args.max_train_steps = None
    return args


def validate(args):
    """Reject settings that cannot work, with a message that names the problem."""
    def check(ok, message):
        if not ok:
            raise InputError(message)

    check(args.dataset_name, "--dataset_name is required: a hub id or a local copy of Pick-a-Pic-style pairs (the "
                             "reference's image-folder data, --train_data_dir without --dataset_name, is not supported)")
    try:
        check_mu(args.winner_preserving_mu)
    except ValueError as err:
        raise InputError(str(err)) from None
    check(not (args.use_winner_preserving and args.train_method == "sft"),
          "--use_winner_preserving needs a loser branch; sft trains on winners only")
    check(0.0 <= args.dmpo_alpha < 1.0, f"--dmpo_alpha must lie in [0, 1), got {args.dmpo_alpha}")
    check(0.0 <= args.proportion_empty_prompts <= 1.0, "--proportion_empty_prompts must lie in [0, 1]")
    check(0.0 <= args.is_clip_eps < 1.0, f"--is_clip_eps must lie in [0, 1), got {args.is_clip_eps}")
    check(args.train_batch_size >= 1 and args.gradient_accumulation_steps >= 1, "batch sizes must be >= 1")
    check(not (args.streaming and args.max_train_steps is None), "--streaming needs --max_train_steps")
    check(not (args.choice_model and args.train_method == "sft"), "--choice_model needs pairs; sft trains on winners")
    check(not (args.sdxl_true_time_ids and not args.sdxl), "--sdxl_true_time_ids needs --sdxl")
    check(args.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (0 turns clipping off), got {args.max_grad_norm}")
    check(not (args.ref_unet and args.train_method == "sft"), "--ref_unet needs a preference objective; sft has no reference")
    check(args.image_column is None,
          "--image_column: preference pairs are read from the columns jpg_0 and jpg_1 (the reference ignores "
          "--image_column for pairs too); rename your dataset's image columns to jpg_0 and jpg_1")
    models.check_source(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    sdxl = models.is_sdxl_pipeline(args.pretrained_model_name_or_path)
    check(sdxl in (None, args.sdxl),
          f"{args.pretrained_model_name_or_path} is {'an SDXL' if sdxl else 'an SD1.x'} pipeline: "
          f"{'add' if sdxl else 'remove'} --sdxl")
    for flag in ("pretrained_vae_model_name_or_path", "unet_init", "ref_unet"):
        value = getattr(args, flag)
        if value and value != "base" and not os.path.exists(value) and not models.HUB_ID.fullmatch(value):
            raise InputError(f"--{flag} {value!r}: not found")


# ---- models ----------------------------------------------------------------------------------


def reference_spec(args) -> str:
    """Where the reference UNet comes from: --ref_unet, else --unet_init (as the reference), else the base."""
    return args.ref_unet or args.unet_init or "base"


def load_models(args):
    """Tokenizers, text encoders, VAE, policy UNet and (unless sft) reference UNet."""
    import copy

    base = args.pretrained_model_name_or_path
    hub = dict(revision=args.revision, cache_dir=args.cache_dir)
    tokenizers, text_encoders = models.load_text_side(base, args.sdxl, **hub)
    vae = models.load_vae(base, args.pretrained_vae_model_name_or_path, **hub)
    policy_spec = args.unet_init or "base"
    unet = models.load_unet(policy_spec, base, "--unet_init", **hub)
    ref_unet = None
    if args.train_method != "sft":
        ref_spec = reference_spec(args)
        if ref_spec == policy_spec:  # the reference starts where the policy starts: copy, don't load twice
            ref_unet = copy.deepcopy(unet)
        else:
            ref_unet = models.load_unet(ref_spec, base, "--ref_unet", **hub)
    return tokenizers, text_encoders, vae, unet, ref_unet


def build_optimizer(args, params, lr):
    if args.use_adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=args.adam_weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False)
    return torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


# ---- one micro-batch -------------------------------------------------------------------------


class Step:
    """Computes the loss of one micro-batch; everything it needs is fixed for the run."""

    def __init__(self, args, accelerator, unet, ref_unet, vae, prompt_encoder, noise_scheduler, weight_dtype,
                 timesteps: tuple[int, int], chooser=None):
        self.args, self.accelerator, self.chooser = args, accelerator, chooser
        self.unet, self.ref_unet, self.vae = unet, ref_unet, vae
        self.prompt_encoder, self.noise_scheduler, self.weight_dtype = prompt_encoder, noise_scheduler, weight_dtype
        self.t_lo, self.t_hi = timesteps  # draw t from [t_lo, t_hi)
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"unsupported scheduler prediction_type {self.prediction_type!r}")
        # The reference's numerics (kept as the default): under bf16 its latents, noise, noisy latents
        # and target stay in the weight dtype, its reference UNet runs in pure bf16 without autocast,
        # and its reference losses are computed and rounded in bf16. --loss_precision fp32 keeps all
        # of these in fp32 instead.
        self.reference_numerics = args.loss_precision == "reference"
        self.latent_dtype = weight_dtype if self.reference_numerics else torch.float32

    def __call__(self, batch):
        args, device = self.args, self.accelerator.device
        pixels = batch["pixels"].to(device, non_blocking=True)  # (B, k, 3, H, W): k = 2 (winner, loser) or 1 (sft)
        B, k = pixels.shape[:2]
        if self.chooser is not None:  # AI feedback: the scorer decides which image of each pair wins
            images, captions = batch["raw_images"], batch["raw_captions"]
            scores = self.chooser.score([im for pair in images for im in pair], [c for c in captions for _ in (0, 1)])
            scores_0, scores_1 = scores[0::2], scores[1::2]
            pixels = order_by_scores(pixels, scores_0, scores_1)
            batch["time_ids"] = order_by_scores(batch["time_ids"], scores_0, scores_1)
        pixels = pixels.transpose(0, 1).reshape(B * k, *pixels.shape[2:])  # winners first
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
            latents = latents.to(self.latent_dtype) * self.vae.config.scaling_factor
        # One timestep and one noise per pair, shared by its winner and loser. The noise is drawn in
        # fp32 and then rounded to the latents' dtype, so both --loss_precision modes see the same draws.
        noise = torch.randn_like(latents[:B], dtype=torch.float32).to(latents.dtype).repeat(k, 1, 1, 1)
        t = torch.randint(self.t_lo, self.t_hi, (B,), device=device).repeat(k)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        # The caption is encoded once and shared by both branches and both UNets.
        cond = self.prompt_encoder(batch["captions"], device, self.weight_dtype).repeat(k)
        if args.sdxl and args.sdxl_true_time_ids:  # (B, k, 6) -> winners' then losers' rows
            cond.time_ids = batch["time_ids"].transpose(0, 1).reshape(B * k, 6).to(device, cond.time_ids.dtype)
        cond = cond.unet_kwargs()
        with self.accelerator.autocast():
            model_pred = self.unet(noisy, t, **cond).sample

        weights, stats = None, {}
        if args.timestep_weighting != "none":
            log_w = log_importance_weights(model_pred, target, t, self.noise_scheduler.alphas_cumprod,
                                           self.prediction_type, torch.randn_like(model_pred, dtype=torch.float32))
            log_w = log_w if k == 1 else pair_log_weights(log_w)
            weights = pair_weights(log_w, args.timestep_weighting, args.is_mask_threshold, args.is_clip_eps)
            stats = {"kept_fraction": (weights > 0).float().mean(), "importance_weight": log_w.exp().mean()}

        if k == 1:
            loss, loss_stats = sft_loss(model_pred, target, weights)
            return loss, {**loss_stats, **stats}
        ref_autocast = contextlib.nullcontext() if self.reference_numerics else self.accelerator.autocast()
        with torch.no_grad(), ref_autocast:
            ref_pred = self.ref_unet(noisy, t, **cond).sample
        scale = 1.0
        if args.use_winner_preserving:
            scale = winner_preserving_scale(model_pred, target, args.winner_preserving_mu,
                                            per_sample=args.winner_preserving_per_sample)
        loss, loss_stats = preference_loss(
            model_pred, ref_pred, target, method=args.train_method, beta=args.beta_dpo,
            dmpo_alpha=args.dmpo_alpha, sdxl=args.sdxl, loser_scale=scale, pair_weights=weights,
            upcast=not self.reference_numerics,
        )
        return loss, {**loss_stats, **stats}


# ---- outputs ---------------------------------------------------------------------------------


def run_config(args, accelerator, weight_dtype, timesteps: tuple[int, int], resume_path: str | None) -> dict:
    """Every setting after defaults and validation, plus what the run derives from them."""
    import accelerate
    import diffusers
    import transformers

    world, accum = accelerator.num_processes, args.gradient_accumulation_steps
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in ("local_rank", "image_column")}
    derived = {
        "num_processes": world,
        "pairs_per_step": args.train_batch_size * accum * world,
        "effective_lr": args.learning_rate * (args.train_batch_size * accum * world if args.scale_lr else 1),
        "optimizer": "Adafactor" if args.use_adafactor else "AdamW",
        "gradient_clipping": f"clip at {float(args.max_grad_norm)}" if args.max_grad_norm > 0 else "off",
        "mixed_precision_used": accelerator.mixed_precision,
        "weight_dtype": str(weight_dtype).removeprefix("torch."),
        "loss_precision": args.loss_precision,
        "process_seeds": "seed + process index (as the reference)",
        "seed_of_process_0": args.seed,
        "timestep_range": list(timesteps),
        "policy_unet": args.unet_init or "base",
        "reference_unet": None if args.train_method == "sft" else reference_spec(args),
        "resumed_from": resume_path,
        "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
    }
    return {**settings, "derived": derived}


def write_model_card(config: dict, step: int, num_pairs, path: str) -> None:
    c, d = config, config["derived"]
    safeguard = (f"on (mu = {c['winner_preserving_mu']}, "
                 f"{'per pair' if c['winner_preserving_per_sample'] else 'per micro-batch'})"
                 if c["use_winner_preserving"] else "off")
    lines = [
        "---", "library_name: diffusers", f"base_model: {c['pretrained_model_name_or_path']}",
        "tags: [text-to-image, diffusion, preference-optimization]", "---", "",
        f"# {c['train_method']} fine-tune of {c['pretrained_model_name_or_path']}", "",
        "Trained with this project's `train.py`. Load with "
        "`UNet2DConditionModel.from_pretrained(path, subfolder=\"unet\")`. Every setting is in "
        "`train_config.json`.", "",
        "| setting | value |", "|---|---|",
        f"| base model | {c['pretrained_model_name_or_path']} |",
        f"| architecture | {'SDXL' if c['sdxl'] else 'SD1.x'} |",
        f"| initial UNet / reference UNet | {d['policy_unet']} / {d['reference_unet']} |",
        f"| method | {c['train_method']} |",
        f"| beta | {c['beta_dpo']} |",
        f"| DMPO alpha | {c['dmpo_alpha']} |",
        f"| winner-preserving safeguard | {safeguard} |",
        f"| timestep weighting | {c['timestep_weighting']} |",
        f"| data | {c['dataset_name']} (split {c['split']}, {num_pairs if num_pairs is not None else 'streamed'} pairs) |",
        f"| resolution | {c['resolution']} |",
        f"| optimizer steps | {step} |",
        f"| pairs per step | {c['train_batch_size']} x {c['gradient_accumulation_steps']} accumulation x "
        f"{d['num_processes']} processes |",
        f"| learning rate | {d['effective_lr']:g} ({c['lr_scheduler']}, {c['lr_warmup_steps']} warmup steps) |",
        f"| optimizer | {d['optimizer']}, gradient clipping: {d['gradient_clipping']} |",
        f"| mixed precision | {d['mixed_precision_used']}, loss precision: {d['loss_precision']} |",
        f"| seed | {c['seed']} (+ process index) |",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---- the recipe ------------------------------------------------------------------------------


def train(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from eval.files import write_json_atomic

    validate(args)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        logger.warning("no GPU: --mixed_precision fp16 falls back to 'no'")
        args.mixed_precision = "no"
    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    for noisy_logger in ("diffusers", "transformers", "datasets", "httpx"):
        logging.getLogger(noisy_logger).setLevel(logging.WARNING)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    accum, world = args.gradient_accumulation_steps, accelerator.num_processes

    resume_path = checkpoints.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    resume_state = None
    if resume_path:
        with open(os.path.join(resume_path, checkpoints.STATE_FILE)) as f:
            resume_state = json.load(f)
        args.seed = resume_state["seed"] if args.seed is None else args.seed
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)  # the reference's default is unseeded
    set_seed(args.seed + accelerator.process_index)  # as the reference: each process its own stream

    # The settings and the data are checked before any model loads.
    noise_scheduler = models.load_scheduler(DDPMScheduler, args.pretrained_model_name_or_path,
                                            revision=args.revision, cache_dir=args.cache_dir)
    try:
        timesteps = timestep_range(args.timestep_weighting, args.timestep_range,
                                   noise_scheduler.config.num_train_timesteps)
    except ValueError as err:
        raise InputError(f"--timestep_range: {err}") from None
    start_step = resume_state["global_step"] if resume_state else 0
    dataloader, num_pairs = build_dataloader(args, rank=accelerator.process_index, world_size=world,
                                             start_micro_batch=start_step * accum)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * math.ceil(len(dataloader) / accum)
    config = run_config(args, accelerator, weight_dtype, timesteps, resume_path)
    if accelerator.is_main_process:
        write_json_atomic(config, os.path.join(args.output_dir, CONFIG_FILE))
    if args.dry_run:
        logger.info("dry run: the settings and the data check out; wrote %s",
                    os.path.join(args.output_dir, CONFIG_FILE))
        accelerator.end_training()
        return {}

    # Models: the policy trains in fp32 under autocast; everything frozen runs in the weight dtype.
    tokenizers, text_encoders, vae, unet, ref_unet = load_models(args)
    for frozen in [*text_encoders, vae, ref_unet]:
        if frozen is not None:
            frozen.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    if args.sdxl and weight_dtype == torch.float16 and not args.pretrained_vae_model_name_or_path:
        vae.to(dtype=torch.float32)  # SDXL's original VAE overflows in fp16 (NaN latents)
        logger.warning("fp16 with SDXL's own VAE: encoding in fp32; the fp16-fix VAE "
                       "(--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix) is faster")
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    prompt_encoder = PromptEncoder(tokenizers, text_encoders, args.resolution)

    optimizer = build_optimizer(args, unet.parameters(), config["derived"]["effective_lr"])
    unet, optimizer = accelerator.prepare(unet, optimizer)
    # The reference steps its prepared scheduler once per optimizer step per process, with warmup
    # and length multiplied by the process count: the warmup counts optimizer steps. So do we.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    if resume_path:
        checkpoints.load_checkpoint(resume_path, accelerator, unet, optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d", resume_path, start_step)

    if accelerator.is_main_process and report_to:
        flat = {k: v for k, v in {**config, **config["derived"]}.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, flat)
    chooser = None
    if args.choice_model:
        from eval.score import parse_sources
        from eval.scorers import build_scorer

        sources = parse_sources(args.choice_model_source).get(args.choice_model, {})
        chooser = build_scorer(args.choice_model, device=str(accelerator.device), **sources)
    step_fn = Step(args, accelerator, unet, ref_unet, vae, prompt_encoder, noise_scheduler, weight_dtype, timesteps,
                   chooser)
    logger.info("%s on %s: %d pairs per step (%d per process x %d accumulation x %d processes), %d steps, lr %g, "
                "gradient clipping: %s, loss precision: %s", args.train_method, "SDXL" if args.sdxl else "SD1.x",
                config["derived"]["pairs_per_step"], args.train_batch_size, accum, world, args.max_train_steps,
                config["derived"]["effective_lr"], config["derived"]["gradient_clipping"], args.loss_precision)

    batches = iter(dataloader)
    progress = tqdm(range(start_step, args.max_train_steps), initial=start_step, total=args.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="steps")
    logs = {}
    metrics_file = os.path.join(args.output_dir, "metrics.jsonl")
    if accelerator.is_main_process:
        if os.path.exists(metrics_file):  # keep the steps before the resume point, drop any after it
            kept = [line for line in open(metrics_file) if json.loads(line)["step"] <= start_step]
            with open(metrics_file, "w") as f:
                f.writelines(kept)
    run_state = {"seed": args.seed, "train_method": args.train_method, "sdxl": args.sdxl}
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf  # inf: measure the norm, clip nothing
    for step in range(start_step, args.max_train_steps):
        started = time.perf_counter()
        step_stats = []
        for micro in range(accum):
            batch = next(batches)
            # Gradients are all-reduced only on the last micro-batch of a step.
            sync = accelerator.no_sync(unet) if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                loss, stats = step_fn(batch)
                accelerator.backward(loss / accum)
            step_stats.append({"loss": loss.detach(), **stats})
        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), max_norm)  # the norm before clipping
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # One device sync per step: average over micro-batches, then over processes.
        keys = list(step_stats[0].keys())
        means = [torch.stack([s[k].float() for s in step_stats]).mean() for k in keys]
        if grad_norm is not None:
            keys.append("grad_norm")
            means.append(grad_norm.float().reshape(()))
        means = accelerator.reduce(torch.stack(means), reduction="mean").tolist()
        logs = dict(zip(keys, means), lr=lr_scheduler.get_last_lr()[0],
                    step_seconds=time.perf_counter() - started)
        accelerator.log(logs, step=step + 1)
        if accelerator.is_main_process:  # the same numbers as JSON lines, for scripts and plots
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": step + 1, **logs}) + "\n")
        progress.update(1)
        progress.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "implicit_acc", "lr") if k in logs})

        if args.checkpointing_steps and (step + 1) % args.checkpointing_steps == 0:
            path = checkpoints.save_checkpoint(accelerator, args.output_dir, step + 1, unet, optimizer, lr_scheduler,
                                               run_state, args.checkpoints_total_limit)
            logger.info("saved %s", path)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        tmp = os.path.join(args.output_dir, "unet.tmp")
        model.save_pretrained(tmp)  # safetensors
        final = os.path.join(args.output_dir, "unet")
        if os.path.exists(final):
            import shutil

            shutil.rmtree(final)
        os.replace(tmp, final)
        write_model_card(config, args.max_train_steps, num_pairs, os.path.join(args.output_dir, "README.md"))
        logger.info("saved the trained UNet to %s", final)
    accelerator.end_training()
    return logs


@reports_input_errors
def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
