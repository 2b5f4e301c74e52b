"""Time and count the training step and sampling on the real SD1.5 / SDXL / SD3.5-medium / Wan2.1-T2V-1.3B /
CogVideoX-2B and -5B architectures.

    python bench.py --arch sd15 --resolution 64 --batch_size 1 --steps 2 --json out.json     # CPU
    python bench.py --arch sdxl --resolution 1024 --count_only                                # FLOPs only
    python bench.py --arch sd3 --resolution 1024 --count_only                                 # SD3.5-medium
    python bench.py --arch wan21 --count_only                                                 # Wan2.1, 81 x 480x832
    python bench.py --arch sd15 --resolution 512 --batch_size 8 --mixed_precision bf16 \\
        --latent_cache --compile --compare reference-settings                               # a GPU
    python bench.py --arch sd15 --mode sample --resolution 512 --batch_size 16                # generation
    python bench.py --mode loader --resolution 512 --batch_size 8                             # data loading

The models are built from the configs in sdpo/configs/ with random weights (or loaded from a local
pipeline folder with --pretrained). The training step is train.py's own: `train.setup` builds the
same Step, optimizer and schedule, and `train.train_step` runs the same micro-batches, backward,
clip and optimizer step; only the batches are synthetic (random pixels, or random latents with
--latent_cache). Defaults follow the launchers: the safeguard on, AdamW for SD1.5, Adafactor with
gradient checkpointing for SDXL and SD3 (the SD3 launchers' settings).

Printed, and written to --json:
- FLOPs per pair, counted with torch's FlopCounterMode over one real step and split into the VAE,
  the text encoders, the policy UNet (forward and backward), the reference UNet (forward) and the
  optimizer. These are model FLOPs: the count runs without gradient checkpointing, and the forward
  it recomputes is reported apart (`recompute_flops_per_pair`). --count_only builds everything on
  the meta device and only counts (any size fits);
- step time after warm-up (CUDA events on a GPU), pairs/s, peak memory, and MFU against the GPU's
  peak bf16 dense FLOP/s (a table below, or --peak_tflops; null on a CPU);
- with --compare reference-settings: the same measurement of our step with the reference's
  settings, in the same process (images encoded every step, the reference's loss precision, no
  compile), and the speed-up over it. This is our code both times, so it measures what the options
  gain; the reference's own code is timed against ours by scripts/compare_reference.py.

On a CPU the process keeps what a step frees for the next step, as train.py does by default
(--host_memory reuse).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

import train
from sdpo import architectures, checkpoints, families, host_memory, models
from sdpo.errors import ArgumentParser, InputError, reports_input_errors
from sdpo.files import write_json_atomic

# Peak dense bf16 tensor-core FLOP/s per GPU (vendor datasheets), matched against the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0,
               "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}
PAPER = {"sd15": dict(mu="0.9", adafactor=False, checkpointing=False),
         "sdxl": dict(mu="0.6", adafactor=True, checkpointing=True),
         "sd3": dict(mu="0.6", adafactor=True, checkpointing=True),  # scripts/train/sd3_*.sh
         # scripts/train/{wan21,cogvideox}_diffusion_dpo.sh
         "wan21": dict(mu="0.6", adafactor=False, checkpointing=True),
         "cogvideox": dict(mu="0.6", adafactor=False, checkpointing=True),
         "cogvideox5b": dict(mu="0.6", adafactor=False, checkpointing=True)}
# The optimizer's elementwise arithmetic, which FlopCounterMode does not count (it counts matrix
# products, convolutions and attention), estimated per trainable parameter from the update rules:
# AdamW: decoupled decay 1, first moment 3, second moment 4, sqrt(v)/c + eps 3, the update 3;
# Adafactor (factored, as transformers runs it): RMS of the weight 2, grad^2 + eps 2, row and column
# means 2, the factored estimate times the grad 2, RMS clip 3, lr 1, decay 2, the update 2;
# AdamW8bit (bitsandbytes): AdamW's 14, plus dequantising the two moments 2 and quantising them
# again (block maximum, scale, rounding) 4; its kernels do not run on the meta device, so its step is
# not run while counting.
# train_step's gradient norm, always measured and applied: square and sum 2, scale 1.
OPTIMIZER_FLOPS_PER_PARAMETER = {"AdamW": 14, "Adafactor": 16, "AdamW8bit": 20}
GRAD_NORM_FLOPS_PER_PARAMETER = 3
CAPTION = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def parse_args(argv=None):
    p = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=architectures.ARCHITECTURES, default="sd15")
    p.add_argument("--pretrained", default=None, help="a local pipeline folder instead of random weights")
    p.add_argument("--mode", choices=["train", "sample", "loader"], default="train")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (SD1.5) or 1024 (SDXL, SD3)")
    p.add_argument("--num_frames", type=int, default=None,
                   help="video: frames per clip (default: the pipeline's, Wan2.1 81, CogVideoX 49)")
    p.add_argument("--height", type=int, default=None, help="video: clip height (default 480)")
    p.add_argument("--width", type=int, default=None, help="video: clip width (default: Wan2.1 832, CogVideoX 720)")
    p.add_argument("--batch_size", type=int, default=1, help="pairs per step (train), prompts per batch (sample)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (or sampling batches)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--train_method", default="diffusion-dpo", choices=["diffusion-dpo", "dspo", "dmpo", "sft"])
    p.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                   help="default bf16 on a GPU, no on a CPU")
    p.add_argument("--loss_precision", default="fp32", choices=["reference", "fp32"])
    p.add_argument("--use_adafactor", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--latent_cache", action="store_true", help="batches of cached latents: no VAE in the step")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (train.py --compile)")
    p.add_argument("--use_lora", action="store_true",
                   help="LoRA adapters on the frozen UNet, the base with adapters off as the reference (train.py --use_lora)")
    p.add_argument("--lora_rank", type=int, default=8, help="LoRA rank (train.py --lora_rank)")
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (train.py --use_8bit_adam)")
    p.add_argument("--compare", choices=["reference-settings"], default=None,
                   help="also time our step with the reference's settings (images encoded every step, its loss "
                        "precision, no compile) and print the speed-up: our code both times; the reference's own "
                        "code is timed by scripts/compare_reference.py")
    p.add_argument("--count_only", action="store_true", help="count FLOPs on the meta device; no timing")
    p.add_argument("--sample_steps", type=int, default=50, help="denoising steps per image (--mode sample)")
    p.add_argument("--loader_pairs", type=int, default=64, help="rows of the synthetic parquet (--mode loader)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="dataloader workers to time")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak FLOP/s in TFLOP/s, for MFU")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    family = architectures.family(args.arch)
    if family.video and args.resolution is not None:
        raise InputError(f"--resolution: {family.label} clips are sized with --height and --width")
    if args.resolution is None:
        args.resolution = family.resolution
    if family.video:
        args.height = family.size[0] if args.height is None else args.height
        args.width = family.size[1] if args.width is None else args.width
        args.num_frames = family.num_frames if args.num_frames is None else args.num_frames
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device.startswith("cuda") else "no"
    for flag, key in (("use_adafactor", "adafactor"), ("gradient_checkpointing", "checkpointing")):
        if getattr(args, flag) is None:
            setattr(args, flag, PAPER[args.arch][key])
    check_args(args)
    return args


def check_args(args) -> None:
    """Refuse a value bench.py cannot use, in one line that names the flag, before any model is built."""
    from sdpo.flags import device, image_size, no_empty_values, output_file

    no_empty_values(args)
    image_size(args.resolution, "--resolution")
    for flag, low in (("batch_size", 1), ("steps", 1), ("warmup", 0), ("sample_steps", 1), ("loader_pairs", 1)):
        if getattr(args, flag) < low:
            raise InputError(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    if min(args.workers) < 0:
        raise InputError(f"--workers must be >= 0 each, got {' '.join(map(str, args.workers))}")
    if args.mode == "loader" and args.loader_pairs < args.batch_size:
        raise InputError(f"--loader_pairs {args.loader_pairs} is less than one batch (--batch_size {args.batch_size})")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):
        raise InputError(f"--peak_tflops must be a positive number, got {args.peak_tflops}")
    # Flags that the other modes would ignore without a word.
    for flag, modes in (("latent_cache", ("train",)), ("compile", ("train",)), ("compare", ("train",)),
                        ("count_only", ("train", "sample")), ("pretrained", ("train", "sample"))):
        if getattr(args, flag) and args.mode not in modes:
            raise InputError(f"--{flag} has no effect with --mode {args.mode} (only with --mode {' or '.join(modes)})")
    if args.lora_rank < 1:
        raise InputError(f"--lora_rank must be >= 1, got {args.lora_rank}")
    for flag in ("use_lora", "use_8bit_adam"):
        if getattr(args, flag) and args.mode != "train":
            raise InputError(f"--{flag} has no effect with --mode {args.mode} (only with --mode train)")
    if args.use_8bit_adam:
        if args.use_adafactor:
            raise InputError("--use_8bit_adam and Adafactor exclude each other (SDXL uses Adafactor by default: add "
                             "--no-use_adafactor)")
        train.import_bitsandbytes()
    family = architectures.family(args.arch)
    if family.video:
        for flag in ("latent_cache", "compare"):
            if getattr(args, flag):
                raise InputError(f"--{flag} is not supported for video models ({family.label}) yet")
        if args.mode == "loader":
            raise InputError("--mode loader reads image pairs; video data loading is not benchmarked yet")
        if args.mode == "sample" and not args.count_only:
            raise InputError(f"--mode sample times the image sampler; for {family.label} count a video's FLOPs with "
                             f"--count_only (eval.generate samples videos with the pipeline)")
        for flag in ("height", "width"):
            if getattr(args, flag) < 1 or getattr(args, flag) % family.size_multiple:
                raise InputError(f"--{flag} {getattr(args, flag)}: {family.label} takes sizes that are multiples of "
                                 f"{family.size_multiple}")
        if args.num_frames < 1 or (args.num_frames - 1) % 4:
            raise InputError(f"--num_frames {args.num_frames}: {family.label} clips have 4k + 1 frames")
    elif any(v is not None for v in (args.num_frames, args.height, args.width)):
        raise InputError(f"--num_frames, --height and --width are for video models; --arch {args.arch} is "
                         f"{family.article} {family.label} (images: --resolution)")
    if args.compare and args.count_only:
        raise InputError("--compare reference-settings times both configurations: drop --count_only")
    device(args.device)
    if args.json is not None:
        output_file(args.json, "--json")
    if args.pretrained:
        models.check_source(args.pretrained, "--pretrained")
        found = families.detect(args.pretrained, "--pretrained")
        if found is not None and found.name != args.arch:
            raise InputError(f"--pretrained {args.pretrained} is {found.article} {found.label} pipeline: pass --arch "
                             f"{found.name}")
    if args.mode == "sample":  # more steps than the schedule has timesteps only repeat them, for hours
        limit = scheduler_for(args).config.num_train_timesteps
        if args.sample_steps > limit:
            raise InputError(f"--sample_steps must be at most {limit}, the scheduler's training timesteps, "
                             f"got {args.sample_steps}")


# ---- the training step ------------------------------------------------------------------------


def train_args(args, *, latent_cache: bool, loss_precision: str, compile_: bool):
    """train.py's settings for a benchmark step, as the launchers set them."""
    video = architectures.family(args.arch).video
    size = ["--num_frames", str(args.num_frames), "--height", str(args.height), "--width", str(args.width)] if video \
        else ["--resolution", str(args.resolution)]
    argv = ["--pretrained_model_name_or_path", args.pretrained or f"<{args.arch} random>", "--dataset_name", "<synthetic>",
            "--output_dir", tempfile.mkdtemp(prefix="bench-"), *size,
            "--train_batch_size", str(args.batch_size), "--train_method", args.train_method,
            "--mixed_precision", args.mixed_precision, "--loss_precision", loss_precision, "--report_to", "none",
            "--seed", "0", "--lr_warmup_steps", "0"]
    if args.train_method != "sft":
        argv += ["--use_winner_preserving", "--winner_preserving_mu", PAPER[args.arch]["mu"]]
    argv += ["--use_adafactor" if args.use_adafactor else "--no-use_adafactor",
             "--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing"]
    if args.arch == "sdxl":
        argv.append("--sdxl")
    if compile_:
        argv.append("--compile")
    if args.use_lora:
        argv += ["--use_lora", "--lora_rank", str(args.lora_rank)]
    if args.use_8bit_adam:
        argv.append("--use_8bit_adam")
    if latent_cache:
        argv += ["--latent_cache", "<synthetic>"]
    return train.Settings(train.parse_args(argv), model_family=architectures.family(args.arch).name)


def synthetic_batches(args, targs, tokenizers, latent_channels: int, latent_cache: bool, count: int = 2):
    """Endless batches shaped like the dataloader's: random pixels, or random cached latents and
    token ids (as the cache stores them). `count` distinct batches are made before any timing and
    then cycled (in pinned memory on a GPU, as the dataloader gives them), so that the timed steps
    do not include making them: in training, dataloader workers prepare batches beside the step."""
    import itertools

    from sdpo.data import PairBatch

    B, k, c = args.batch_size, (1 if targs.train_method == "sft" else 2), latent_channels
    g = torch.Generator().manual_seed(0)
    size = args.resolution // 8
    family = families.get(targs.model_family)
    dtype = family.vae_dtype(models.DTYPES[targs.mixed_precision], bool(targs.pretrained_vae_model_name_or_path))
    pin = torch.cuda.is_available() and str(args.device).startswith("cuda")
    batches = []
    for _ in range(count):
        batch = PairBatch(time_ids=torch.zeros(B, k, 6))
        if latent_cache:
            batch.latent_mean = torch.randn(B, k, c, size, size, generator=g).to(dtype)
            batch.latent_std = torch.full((B, k, c, size, size), 1e-3, dtype=dtype)
            batch.caption_ids = [torch.randint(0, min(len(t), 49406), (B, length), generator=g)
                                 for t, length in zip(tokenizers, family.token_lengths(tokenizers))]
        else:
            frames = (args.num_frames,) if family.video else ()  # clips: (B, k, F, 3, H, W)
            height, width = (args.height, args.width) if family.video else (args.resolution, args.resolution)
            batch.pixels = torch.rand(B, k, *frames, 3, height, width, generator=g) * 2 - 1
            batch.captions = [CAPTION] * B
        batches.append(batch.pin_memory() if pin else batch)
    return itertools.cycle(batches)


def build_run(args, parts, device: torch.device, *, latent_cache=False, loss_precision=None, compile_=None):
    """train.py's Run for a benchmark configuration, on `device` (meta: count FLOPs only)."""
    targs = train_args(args, latent_cache=latent_cache, loss_precision=loss_precision or args.loss_precision,
                       compile_=args.compile if compile_ is None else compile_)
    accelerator = train.make_accelerator(targs, targs.mixed_precision, cpu=device.type != "cuda",
                                         device_placement=device.type != "meta")
    noise = architectures.family(args.arch).noise_process(scheduler_for(args), targs)
    timesteps = (0, noise.grid_size())
    vae = parts[2]
    total_steps = args.warmup + args.steps
    inputs = train.Inputs(config=checkpoints.run_config(targs, 1, accelerator.mixed_precision, timesteps, None,
                                                        total_steps),
                          noise=noise, timesteps=timesteps, dataloader=None, num_pairs=None,
                          validation_pairs=None, start_step=0, total_steps=total_steps, resume_path=None,
                          latent_norm=architectures.family(args.arch).latent_norm(vae.config))
    if latent_cache:  # training from a cache loads no VAE
        parts = (*parts[:2], None, *parts[3:])
    run = train.setup(targs, accelerator, inputs, parts, device=device)
    return run, synthetic_batches(args, targs, parts[0], architectures.family(args.arch).latent_channels(vae.config),
                                  latent_cache)


def scheduler_for(args, cls=None):
    """The training noise schedule (or, as `cls`, another scheduler class) of --pretrained, or of
    the shipped --arch config."""
    if args.pretrained:
        config = models.scheduler_config(args.pretrained, "--pretrained")
    else:
        config = architectures.config(args.arch, "scheduler")
    if cls is None:
        return architectures.family(args.arch).training_scheduler(config)
    return cls.from_config(config)


def model_parts(args, device):
    """(tokenizers, text encoders, VAE, policy, reference) on `device`: the shipped architecture
    with random weights, or a local pipeline (on the meta device, from its configs alone)."""
    import copy

    separate_reference = args.train_method != "sft" and not args.use_lora  # LoRA: the base with adapters off
    if not args.pretrained:
        return architectures.build(args.arch, with_reference=separate_reference, device=device)
    family = architectures.family(args.arch)
    if str(device) == "meta":
        tokenizers, encoders, vae, unet = models.meta_pipeline(args.pretrained, family, "--pretrained")
    else:
        tokenizers, encoders = models.load_text_side(args.pretrained, family, "--pretrained")
        vae = models.load_vae(args.pretrained, None, flag="--pretrained", family=family)
        unet = models.load_unet("base", args.pretrained, base_flag="--pretrained", family=family)
    return tokenizers, encoders, vae, unet, copy.deepcopy(unet) if separate_reference else None


def count_flops(run, batches) -> dict:
    """FLOPs of one training step by part, without gradient checkpointing (model FLOPs), and the
    policy's forward alone (what checkpointing recomputes). Count on the meta device: there
    attention decomposes into matrix products the counter sees, where the CPU's fused attention
    kernel has no FLOP formula and would count as 0. The optimizer's part is estimated from its
    update rule (OPTIMIZER_FLOPS_PER_PARAMETER): the counter sees no elementwise arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = run.accelerator.unwrap_model(run.unet)
    unet = getattr(unet, "_orig_mod", unet)
    denoiser = type(unet).__name__
    checkpointing = unet.is_gradient_checkpointing
    if checkpointing:
        unet.disable_gradient_checkpointing()
    micro = run.compute_loss
    reference_flops, reference_in_unet = [], []  # all of the reference's; what the counter also put under the UNet
    if micro.reference is not None:  # counted apart: with LoRA it is the policy's own module
        reference = micro.reference

        def counted_reference(*args, **kwargs):
            with FlopCounterMode(display=False) as inner:
                out = reference(*args, **kwargs)
            reference_flops.append(inner.get_total_flops())
            reference_in_unet.append(sum(inner.get_flop_counts().get(denoiser, {}).values()))
            return out

        micro.reference = counted_reference
    vae_flops = []
    if micro.vae is not None:  # encode() is not forward(): count it with a counter of its own
        encode = micro.vae.encode

        def counted_encode(*args, **kwargs):
            with FlopCounterMode(display=False) as inner:
                out = encode(*args, **kwargs)
            vae_flops.append(inner.get_total_flops())
            return out

        micro.vae.encode = counted_encode
    try:
        batch = next(batches)
        with FlopCounterMode(display=False) as counter:
            with FlopCounterMode(display=False) as forward_counter:
                loss, _ = micro(batch)
            loss.backward()
        with FlopCounterMode(display=False) as optimizer_counter:
            if type(getattr(run.optimizer, "optimizer", run.optimizer)).__name__ != "AdamW8bit":
                run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    finally:
        if checkpointing:
            unet.enable_gradient_checkpointing()
        if micro.vae is not None:
            del micro.vae.encode
        micro.reference = run.reference

    def by_module(flop_counter):
        return {name: sum(ops.values()) for name, ops in flop_counter.get_flop_counts().items() if "." not in name}

    modules = by_module(counter)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    per_parameter = OPTIMIZER_FLOPS_PER_PARAMETER[type(optimizer).__name__] + GRAD_NORM_FLOPS_PER_PARAMETER
    parts = {"vae": sum(vae_flops),
             "text": sum(modules.get(name, 0) for name in ("CLIPTextModel", "CLIPTextModelWithProjection",
                                                            "T5EncoderModel", "UMT5EncoderModel")),
             "policy": modules.get(denoiser, 0) - sum(reference_in_unet),
             "reference": sum(reference_flops),
             "optimizer": optimizer_counter.get_total_flops() + per_parameter * trainable}
    parts["total"] = counter.get_total_flops() + parts["optimizer"]
    parts["policy_forward"] = by_module(forward_counter).get(denoiser, 0) - sum(reference_in_unet)
    parts["trainable_parameters"] = trainable
    parts["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    return parts


def timed(work, args, cuda: bool) -> tuple[float, list[float]]:
    """The median seconds of `work()` over --steps calls after --warmup untimed ones (CUDA events
    on a GPU), and every call's time."""
    for _ in range(args.warmup):
        work()
    times = []
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
    return statistics.median(times), times


def time_steps(run, batches, args) -> tuple[float, list[float]]:
    """Seconds per training step: train.py's own step on the benchmark's batches."""
    return timed(lambda: train.train_step(run, batches), args, run.accelerator.device.type == "cuda")


def peak_memory(device) -> int:
    if str(device).startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_flops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def bench_train(args) -> dict:
    device = torch.device("meta") if args.count_only else torch.device(args.device)
    meta = torch.device("meta")
    counted_run, counted_batches = build_run(args, model_parts(args, meta), meta, latent_cache=args.latent_cache,
                                             compile_=False)  # eager: the counter sees every operator
    flops = count_flops(counted_run, counted_batches)
    optimizer = type(getattr(counted_run.optimizer, "optimizer", counted_run.optimizer)).__name__
    del counted_run, counted_batches
    if not args.count_only:
        run, batches = build_run(args, model_parts(args, "cpu"), device, latent_cache=args.latent_cache)
    pairs = args.batch_size
    result = {"mode": "train", "arch": args.arch, "resolution": args.resolution, "batch_size": pairs,
              "device": str(device), "mixed_precision": args.mixed_precision, "latent_cache": args.latent_cache,
              "compile": args.compile, "loss_precision": args.loss_precision, "optimizer": optimizer,
              "gradient_checkpointing": args.gradient_checkpointing, "use_lora": args.use_lora,
              "lora_rank": args.lora_rank if args.use_lora else None,
              "trainable_parameters": flops["trainable_parameters"], "unet_parameters": flops["unet_parameters"],
              "flops_per_pair": flops["total"] / pairs, "flops": {k: flops[k] / pairs for k in ("vae", "text", "policy", "reference", "optimizer")},
              "step_seconds": None, "pairs_per_second": None, "peak_memory_bytes": None, "mfu": None}
    if args.gradient_checkpointing:  # the backward recomputes the policy's forward
        result["recompute_flops_per_pair"] = flops["policy_forward"] / pairs
    if args.count_only:
        return result
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, times = time_steps(run, batches, args)
    peak = peak_flops(args, device)
    result.update(step_seconds=seconds, step_times=times, pairs_per_second=pairs / seconds,
                  peak_memory_bytes=peak_memory(device),
                  mfu=None if peak is None else flops["total"] / seconds / peak,
                  device_name=torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu")
    if args.compare == "reference-settings":
        del run, batches
        gc.collect()
        torch._dynamo.reset()  # compiled graphs hold on to the first run's modules
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ref_flops = count_flops(*build_run(args, model_parts(args, meta), meta, latent_cache=False,
                                           loss_precision="reference", compile_=False))
        ref_run, ref_batches = build_run(args, model_parts(args, "cpu"), device, latent_cache=False,
                                         loss_precision="reference", compile_=False)
        ref_seconds, ref_times = time_steps(ref_run, ref_batches, args)
        result["reference_settings"] = {"flops_per_pair": ref_flops["total"] / pairs, "step_seconds": ref_seconds,
                                        "step_times": ref_times, "pairs_per_second": pairs / ref_seconds,
                                        "peak_memory_bytes": peak_memory(device),
                                        "mfu": None if peak is None else ref_flops["total"] / ref_seconds / peak}
        result["speedup_over_reference_settings"] = ref_seconds / seconds
    return result


# ---- sampling and data loading ------------------------------------------------------------------


def sample_flops(args) -> int:
    """FLOPs of one batch of generation, counted on the meta device: the prompts and the empty
    prompt through the text encoders, `--sample_steps` UNet forwards on the conditional and
    unconditional batch, and the VAE decode."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdpo.conditioning import PromptEncoder

    meta = torch.device("meta")
    family = architectures.family(args.arch)
    tokenizers, encoders, vae, unet, _ = model_parts(argparse.Namespace(**{**vars(args), "train_method": "sft"}), meta)
    n, c = args.batch_size, family.latent_channels(vae.config)
    latent = latent_size(args, family, vae.config)  # (h, w), or (frames, h, w) for a clip
    encode = PromptEncoder(family, tokenizers, encoders, args.resolution, unet.config, sampling=True)
    with FlopCounterMode(display=False) as counter:
        cond = encode([CAPTION] * n + [""], meta)
        both = type(cond)(**{k: None if v is None else torch.cat([v[:n], v[n:].expand(n, *v.shape[1:])])
                             for k, v in vars(cond).items()})
        # (the family's layout: CogVideoX's latents go frames first)
        noisy = family.normalize(torch.zeros(2 * n, c, *latent, device=meta), 1.0, None)
        unet(**family.model_inputs(noisy, torch.zeros((), device=meta), both, unet.config))
    per_step = counter.get_total_flops()
    with FlopCounterMode(display=False) as text_counter:
        encode([CAPTION] * n + [""], meta)
    with FlopCounterMode(display=False) as vae_counter:
        vae.decode(torch.zeros(n, c, *latent, device=meta))
    unet_flops = per_step - text_counter.get_total_flops()
    return text_counter.get_total_flops() + args.sample_steps * unet_flops + vae_counter.get_total_flops()


def latent_size(args, family, vae_config) -> tuple[int, ...]:
    """The VAE latents' spatial size (h, w), and for a clip its frames first: (frames, h, w)."""
    if not family.video:
        return args.resolution // 8, args.resolution // 8
    return (args.num_frames - 1) // family.temporal_compression(vae_config) + 1, args.height // 8, args.width // 8


def bench_sample(args) -> dict:
    if args.count_only:
        flops = sample_flops(args)
        return {"mode": "sample", "arch": args.arch, "resolution": args.resolution, "batch_size": args.batch_size,
                "sample_steps": args.sample_steps, "device": "meta", "flops_per_image": flops / args.batch_size,
                "batch_seconds": None, "images_per_second": None, "peak_memory_bytes": None, "mfu": None}
    from sdpo.conditioning import PromptEncoder
    from sdpo.sampling import sample

    device = torch.device(args.device)
    dtype = models.DTYPES[args.mixed_precision]
    tokenizers, encoders, vae, unet, _ = model_parts(argparse.Namespace(**{**vars(args), "train_method": "sft"}),
                                                     "cpu")
    for encoder in encoders:
        encoder.to(device, dtype).eval()
    unet.to(device, dtype).eval()
    vae.to(device, torch.float32).eval()
    family = architectures.family(args.arch)
    prompt_encoder = PromptEncoder(family, tokenizers, encoders, args.resolution, unet.config, sampling=True)
    scheduler = scheduler_for(args, family.sampling_scheduler_class())
    prompts = [CAPTION] * args.batch_size
    flops = sample_flops(args)  # per batch of args.batch_size images
    seconds, _ = timed(lambda: sample(unet, vae, prompt_encoder, scheduler, prompts, args.resolution, args.resolution,
                                      args.sample_steps, family.sampling_cfg, 0, dtype), args, device.type == "cuda")
    peak = peak_flops(args, device)
    return {"mode": "sample", "arch": args.arch, "resolution": args.resolution, "batch_size": args.batch_size,
            "sample_steps": args.sample_steps, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "flops_per_image": flops / args.batch_size, "batch_seconds": seconds,
            "images_per_second": args.batch_size / seconds, "peak_memory_bytes": peak_memory(device),
            "mfu": None if peak is None else flops / seconds / peak}


def synthetic_cache(targs, tokenizers, folder: str, dtype=torch.bfloat16):
    """A latent cache of the dataset in targs, written as sdpo.cache writes one but with random
    latents of the right shape (the loader's speed does not depend on their values)."""
    from safetensors.torch import save_file

    from sdpo.cache import MANIFEST, cache_settings
    from sdpo.data import LABEL_COLUMN, decided_rows, load_split

    data = load_split(targs.dataset_name, targs.split)
    rows, _ = decided_rows(data[LABEL_COLUMN])
    size, c = targs.resolution // 8, architectures.config(targs.model_family, "vae")["latent_channels"]
    n = len(rows)
    tensors = {"row": torch.tensor(rows), "readable": torch.ones(n, dtype=torch.uint8),
               "label": torch.tensor([float(data[r][LABEL_COLUMN]) for r in rows], dtype=torch.float64),
               "original_size": torch.full((n, 2, 2), targs.resolution, dtype=torch.int32),
               "mean": torch.randn(n, 2, 2, c, size, size).to(dtype), "std": torch.rand(n, 2, 2, c, size, size).to(dtype)}
    lengths = families.get(targs.model_family).token_lengths(tokenizers)
    for i, (tokenizer, length) in enumerate(zip(tokenizers, lengths)):
        tensors[f"ids_{i}"] = torch.randint(0, min(len(tokenizer), 49406), (n, length), dtype=torch.int32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "shard-00000.safetensors"))
    write_json_atomic({"settings": cache_settings(targs, dtype, tokenizers), "pairs": n, "scaling_factor": 0.18215,
                       "shards": [{"file": "shard-00000.safetensors", "pairs": n}]}, os.path.join(folder, MANIFEST))


def bench_loader(args) -> dict:
    """The training dataloader's pairs/s with each number of workers: from a synthetic Pick-a-Pic
    parquet of JPEGs at the resolution (decoding, resizing, cropping, flipping, collating), and from
    a latent cache of it (reading the latents of the chosen flips and the token ids)."""
    from sdpo.cache import LatentCache
    from sdpo.data import build_dataloader
    from sdpo.tiny import build_tiny_pickapic

    folder = tempfile.mkdtemp(prefix="bench-loader-")
    build_tiny_pickapic(folder, num_rows=args.loader_pairs, size=(args.resolution, args.resolution), tie_fraction=0.0)
    tokenizers = architectures.tokenizers(args.arch)
    results = {"parquet": {}, "cache": {}}
    for source in results:
        for workers in args.workers:
            targs = train.parse_args(["--pretrained_model_name_or_path", "<synthetic>", "--dataset_name", folder,
                                      "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
                                      "--seed", "0", "--dataloader_num_workers", str(workers),
                                      *(["--sdxl"] if args.arch == "sdxl" else [])])
            targs.model_family = args.arch
            cache = None
            if source == "cache":
                targs.latent_cache = os.path.join(folder, "cache")
                if not os.path.isdir(targs.latent_cache):
                    synthetic_cache(targs, tokenizers, targs.latent_cache)
                cache = LatentCache(targs.latent_cache, targs, torch.bfloat16, tokenizers)
            loader, pairs, _ = build_dataloader(targs, rank=0, world_size=1, start_micro_batch=0, cache=cache)
            batches = iter(loader)
            next(batches)  # start the workers
            count = max(1, (pairs // args.batch_size) * 2)
            started = time.perf_counter()
            for _ in range(count):
                next(batches)
            results[source][str(workers)] = count * args.batch_size / (time.perf_counter() - started)
            del batches, loader
    return {"mode": "loader", "arch": args.arch, "resolution": args.resolution, "batch_size": args.batch_size,
            "pairs_per_second": results}


# ---- output -------------------------------------------------------------------------------------


def human(value, unit="") -> str:
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def seconds(value) -> str:
    return "-" if value is None else f"{value:.3f} s"


def percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def report(result: dict) -> str:
    lines = [f"{result['mode']} | {result.get('arch', '')} | {result['resolution']} px | "
             f"batch {result['batch_size']} | {result.get('device_name', result.get('device', ''))}"]
    if result["mode"] == "train":
        total = result["flops_per_pair"]
        lora_note = f", LoRA rank {result['lora_rank']}" if result.get("use_lora") else ""
        lines.append(f"trainable params    {result['trainable_parameters']:,} of {result['unet_parameters']:,} "
                     f"in the {architectures.family(result['arch']).denoiser_name}{lora_note}")
        lines.append(f"FLOPs per pair      {human(total, 'FLOP')}")
        for part in ("vae", "text", "policy", "reference", "optimizer"):
            value = result["flops"][part]
            lines.append(f"  {part:17s} {human(value, 'FLOP'):>12s}  {value / total if total else 0:6.1%}")
        if "recompute_flops_per_pair" in result:
            lines.append(f"  (recomputed by gradient checkpointing, not counted: "
                         f"{human(result['recompute_flops_per_pair'], 'FLOP')})")
        rate = result["pairs_per_second"]
        lines += [f"step time           {seconds(result['step_seconds'])}",
                  f"pairs/s             {'-' if rate is None else f'{rate:.3f}'}",
                  f"peak memory         {human(result['peak_memory_bytes'], 'B')}",
                  f"MFU                 {percent(result['mfu'])}"]
        if "reference_settings" in result:
            ref = result["reference_settings"]
            lines += [f"ours with the reference's settings (images encoded every step, its loss precision, no compile): "
                      f"{seconds(ref['step_seconds'])}/step, {ref['pairs_per_second']:.3f} pairs/s, "
                      f"MFU {percent(ref['mfu'])}",
                      f"speed-up over it    {result['speedup_over_reference_settings']:.2f}x"]
    elif result["mode"] == "sample":
        rate = result["images_per_second"]
        lines += [f"FLOPs per image     {human(result['flops_per_image'], 'FLOP')} ({result['sample_steps']} steps)",
                  f"images/s            {'-' if rate is None else f'{rate:.3f}'}",
                  f"peak memory         {human(result['peak_memory_bytes'], 'B')}",
                  f"MFU                 {percent(result['mfu'])}"]
    else:
        lines += [f"pairs/s from {source}, {w} workers: {v:.1f}" for source, rates in result["pairs_per_second"].items()
                  for w, v in rates.items()]
    return "\n".join(lines)


@reports_input_errors
def main(argv=None):
    args = parse_args(argv)
    train.quiet_libraries()
    reused = (args.mode == "train" and not args.count_only and torch.device(args.device).type == "cpu"
              and host_memory.keep_freed_memory())  # as train.py does on a CPU by default (--host_memory reuse)
    result = {"train": bench_train, "sample": bench_sample, "loader": bench_loader}[args.mode](args)
    if args.mode == "train" and not args.count_only:
        result["host_memory_reused"] = bool(reused)
    result["command"] = ["bench.py", *(sys.argv[1:] if argv is None else argv)]
    print(report(result))
    if args.json:
        write_json_atomic(result, args.json)
    return result


if __name__ == "__main__":
    main()
