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
import time

import torch

from sdpo import checkpoints
from sdpo.conditioning import PromptEncoder
from sdpo.data import build_dataloader, order_by_scores
from sdpo.errors import InputError, reports_input_errors
from sdpo.losses import check_mu, preference_loss, sft_loss, winner_preserving_scale
from sdpo.timesteps import MODES, log_importance_weights, pair_log_weights, pair_weights, timestep_range

logger = logging.getLogger("train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # models
    a("--pretrained_model_name_or_path", required=True, help="base pipeline: hub id or local folder")
    a("--pretrained_vae_model_name_or_path", default=None, help="a separate VAE (SDXL: madebyollin/sdxl-vae-fp16-fix)")
    a("--revision", default=None, help="revision of the base pipeline on the hub")
    a("--sdxl", action="store_true", help="the base is an SDXL pipeline (two text encoders)")
    a("--unet_init", default="", help="initialise the policy from this UNet (folder, .safetensors or .pth; the reference stays the base)")
    # data
    a("--dataset_name", required=True, help="hub id, or a local folder with data/<split>-*.parquet, or one parquet file")
    a("--dataset_revision", default=None, help="revision of the dataset on the hub")
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
    a("--choice_model", default=None, choices=["pickscore", "hpsv2", "aesthetics", "clip", "imagereward"],
      help="AI feedback: a reward model picks each pair's winner instead of label_0 (as the reference)")
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
    a("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip (AdamW only, as the reference)")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="gradient checkpointing in the policy UNet (default: on for SDXL)")
    a("--mixed_precision", default="fp16", choices=["no", "fp16", "bf16"], help="(falls back to 'no' on CPU)")
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    a("--seed", type=int, default=None, help="seed (default: random, recorded in checkpoints)")
    a("--seed_per_process", action="store_true",
      help="seed process i with seed + i, so processes draw different noise (the reference seeds all alike)")
    # output
    a("--output_dir", default="sd-model-finetuned")
    a("--logging_dir", default="logs", help="TensorBoard folder, under output_dir")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    a("--resume_from_checkpoint", default="latest", help="'latest', a checkpoint folder, or '' to start afresh")
    args = p.parse_args(argv)

    if args.resolution is None:
        args.resolution = 1024 if args.sdxl else 512
    for flag in ("use_adafactor", "gradient_checkpointing"):
        if getattr(args, flag) is None:
            setattr(args, flag, args.sdxl)  # the reference's SDXL launchers turn both on
    if args.max_train_steps == 0:
        args.max_train_steps = None
    return args


def validate(args):
    """Reject settings that cannot work, with a message that names the problem."""
    def check(ok, message):
        if not ok:
            raise InputError(message)

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
    index = os.path.join(args.pretrained_model_name_or_path, "model_index.json")
    if os.path.isfile(index):
        has_second_encoder = "text_encoder_2" in json.load(open(index))
        check(has_second_encoder == args.sdxl,
              f"{args.pretrained_model_name_or_path} is {'an SDXL' if has_second_encoder else 'an SD1.x'} pipeline: "
              f"{'add' if has_second_encoder else 'remove'} --sdxl")


# ---- models ----------------------------------------------------------------------------------


def load_models(args):
    """Tokenizers, text encoders, VAE, noise scheduler, policy UNet and (unless sft) reference UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base, rev = args.pretrained_model_name_or_path, args.revision
    tokenizers = [CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=rev)]
    text_encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=rev)]
    if args.sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=rev))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", revision=rev))
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=rev)
    else:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", revision=rev)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=rev)
    unet = checkpoints.load_unet(args.unet_init or "base", base, revision=rev)
    ref_unet = None
    if args.train_method != "sft":
        ref_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", revision=rev)
        if args.unet_init:
            checkpoints.check_same_shapes(unet, ref_unet, f"--unet_init {args.unet_init}", "the base UNet")
    return tokenizers, text_encoders, vae, noise_scheduler, unet, ref_unet


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
                 chooser=None):
        self.args, self.accelerator, self.chooser = args, accelerator, chooser
        self.unet, self.ref_unet, self.vae = unet, ref_unet, vae
        self.prompt_encoder, self.noise_scheduler, self.weight_dtype = prompt_encoder, noise_scheduler, weight_dtype
        self.t_lo, self.t_hi = timestep_range(args.timestep_weighting, args.timestep_range,
                                              noise_scheduler.config.num_train_timesteps)
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"unsupported scheduler prediction_type {self.prediction_type!r}")

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
            latents = latents.float() * self.vae.config.scaling_factor
        # One timestep and one noise per pair, shared by its winner and loser.
        noise = torch.randn_like(latents[:B]).repeat(k, 1, 1, 1)
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
        with torch.no_grad(), self.accelerator.autocast():
            ref_pred = self.ref_unet(noisy, t, **cond).sample
        scale = 1.0
        if args.use_winner_preserving:
            scale = winner_preserving_scale(model_pred, target, args.winner_preserving_mu,
                                            per_sample=args.winner_preserving_per_sample)
        loss, loss_stats = preference_loss(
            model_pred, ref_pred, target, method=args.train_method, beta=args.beta_dpo,
            dmpo_alpha=args.dmpo_alpha, sdxl=args.sdxl, loser_scale=scale, pair_weights=weights,
        )
        return loss, {**loss_stats, **stats}


# ---- outputs ---------------------------------------------------------------------------------


def write_model_card(args, step, num_pairs, path):
    safeguard = (f"on (mu = {args.winner_preserving_mu}, {'per pair' if args.winner_preserving_per_sample else 'per micro-batch'})"
                 if args.use_winner_preserving else "off")
    lines = [
        "---", "library_name: diffusers", f"base_model: {args.pretrained_model_name_or_path}",
        "tags: [text-to-image, diffusion, preference-optimization]", "---", "",
        f"# {args.train_method} fine-tune of {args.pretrained_model_name_or_path}", "",
        "Trained with this project's `train.py`. Load with "
        "`UNet2DConditionModel.from_pretrained(path, subfolder=\"unet\")`.", "",
        "| setting | value |", "|---|---|",
        f"| base model | {args.pretrained_model_name_or_path} |",
        f"| architecture | {'SDXL' if args.sdxl else 'SD1.x'} |",
        f"| method | {args.train_method} |",
        f"| beta | {args.beta_dpo} |",
        f"| DMPO alpha | {args.dmpo_alpha} |",
        f"| winner-preserving safeguard | {safeguard} |",
        f"| timestep weighting | {args.timestep_weighting} |",
        f"| data | {args.dataset_name} (split {args.split}, {num_pairs if num_pairs is not None else 'streamed'} pairs) |",
        f"| resolution | {args.resolution} |",
        f"| optimizer steps | {step} |",
        f"| pairs per step | {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x {args.num_processes} processes |",
        f"| learning rate | {args.effective_lr:g} ({args.lr_scheduler}, {args.lr_warmup_steps} warmup steps) |",
        f"| optimizer | {'Adafactor' if args.use_adafactor else 'AdamW'} |",
        f"| mixed precision | {args.mixed_precision} |",
        f"| seed | {args.seed} |",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---- the recipe ------------------------------------------------------------------------------


def train(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    validate(args)
    if args.mixed_precision != "no" and not torch.cuda.is_available():
        logger.warning("no GPU: --mixed_precision %s falls back to 'no'", args.mixed_precision)
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
    args.num_processes = accelerator.num_processes
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    resume_path = checkpoints.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    resume_state = None
    if resume_path:
        with open(os.path.join(resume_path, checkpoints.STATE_FILE)) as f:
            resume_state = json.load(f)
        args.seed = resume_state["seed"] if args.seed is None else args.seed
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)  # the reference's default is unseeded
    # The reference seeds every process alike, so all draw the same noise and timesteps.
    set_seed(args.seed + (accelerator.process_index if args.seed_per_process else 0))

    # Models: the policy trains in fp32 under autocast; everything frozen runs in the weight dtype.
    tokenizers, text_encoders, vae, noise_scheduler, unet, ref_unet = load_models(args)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
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

    accum, world = args.gradient_accumulation_steps, accelerator.num_processes
    args.effective_lr = args.learning_rate * (args.train_batch_size * accum * world if args.scale_lr else 1)
    optimizer = build_optimizer(args, unet.parameters(), args.effective_lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)

    start_step = resume_state["global_step"] if resume_state else 0
    dataloader, num_pairs = build_dataloader(args, rank=accelerator.process_index, world_size=world,
                                             start_micro_batch=start_step * accum)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * math.ceil(len(dataloader) / accum)
    # The reference steps its prepared scheduler once per optimizer step per process, with warmup
    # and length multiplied by the process count: the warmup counts optimizer steps. So do we.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    if resume_path:
        checkpoints.load_checkpoint(resume_path, accelerator, unet, optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d", resume_path, start_step)

    if accelerator.is_main_process and report_to:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("preference-training", config)
    chooser = None
    if args.choice_model:
        from eval.score import parse_sources
        from eval.scorers import build_scorer

        sources = parse_sources(args.choice_model_source).get(args.choice_model, {})
        chooser = build_scorer(args.choice_model, device=str(accelerator.device), **sources)
    step_fn = Step(args, accelerator, unet, ref_unet, vae, prompt_encoder, noise_scheduler, weight_dtype, chooser)
    logger.info("%s on %s: %d pairs per step (%d per process x %d accumulation x %d processes), %d steps, lr %g",
                args.train_method, "SDXL" if args.sdxl else "SD1.x", args.train_batch_size * accum * world,
                args.train_batch_size, accum, world, args.max_train_steps, args.effective_lr)

    batches = iter(dataloader)
    progress = tqdm(range(start_step, args.max_train_steps), initial=start_step, total=args.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="steps")
    logs = {}
    metrics_file = os.path.join(args.output_dir, "metrics.jsonl")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if os.path.exists(metrics_file):  # keep the steps before the resume point, drop any after it
            kept = [line for line in open(metrics_file) if json.loads(line)["step"] <= start_step]
            with open(metrics_file, "w") as f:
                f.writelines(kept)
    run_state = {"seed": args.seed, "train_method": args.train_method, "sdxl": args.sdxl}
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
        if not args.use_adafactor:  # the reference leaves clipping to Adafactor's own update clipping
            accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # One device sync per step: average over micro-batches, then over processes.
        keys = step_stats[0].keys()
        means = torch.stack([torch.stack([s[k].float() for s in step_stats]).mean() for k in keys])
        means = accelerator.reduce(means, reduction="mean").tolist()
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
        write_model_card(args, args.max_train_steps, num_pairs, os.path.join(args.output_dir, "README.md"))
        logger.info("saved the trained UNet to %s", final)
    accelerator.end_training()
    return logs


@reports_input_errors
def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
