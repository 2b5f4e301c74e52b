"""Generate images for a prompt suite with the reference's protocol (docs/methods.md, section
"Evaluation protocol").

    python -m eval.generate --unet_path CKPT --test_json prompts/papv2.json [--sdxl] [--batch_size 16]

CKPT is a reference-style unet.pth state dict, a .safetensors state dict, a diffusers folder
(a train.py output dir or a unet/ folder), or `base` for the unmodified base model. A LoRA
(a train.py --use_lora output folder, diffusers' LoRA format) goes on top of it with --lora_path,
or is given as CKPT itself: a folder with pytorch_lora_weights.safetensors and no UNet means
`--unet_path base --lora_path FOLDER`. The LoRA is loaded as `pipe.load_lora_weights` loads it
(not merged).

Protocol:
- Euler discrete sampling, 50 steps, seed 0, 512x512 (SD1.5) or 1024x1024 (SDXL). SD3/SD3.5 (the
  family is read from the pipeline's model_index.json) samples as its pipeline does by default:
  its flow-matching Euler scheduler, 28 steps, guidance_scale 7 (cfg 6 here), 1024x1024, 256 T5
  tokens (or none with --no_t5).
- The UNet and text encoders run in bf16 (fp32 on CPU) and the VAE decodes in fp32.
- Every prompt starts from the same initial noise: a generator seeded with the seed, per prompt.
  So images do not depend on the batch size.
- The negative branch is the encoded empty prompt. Guidance is
  pred_cond + cfg * (pred_cond - pred_uncond), with cfg = 7.5: the reference's formula, not
  diffusers'. diffusers computes pred_uncond + s * (pred_cond - pred_uncond), so our cfg equals
  diffusers' guidance_scale minus 1: cfg 7.5 here is guidance_scale 8.5 there. Compare with
  diffusers images made at guidance_scale = cfg + 1.

Output, named as the reference names it:
- the folder <output_path>/<suite>_seed<S>_<H>x<W>_<steps>s_<cfg>cfg/, holding <index>_<H>x<W>.png
  with the prompt in the EXIF ImageDescription;
- the manifest <same name>.json: the suite's records with gen_image_path filled in.

Beside the images, <image folder>/generation.json records what made them: the model (the base
pipeline as an absolute path or hub id, the UNet as 'base' or an absolute path, the VAE; local
files with their size and mtime), the protocol (seed, steps, cfg, height, width, dtype, device
type, scheduler) and the prompt of each image index. A rerun keeps an image only when that record
matches this run and the image is complete; otherwise it makes the image again and prints why
(the first field that differs). --recompute makes every image again.

Every file is written under a temporary name that does not end in .png or .json, then renamed,
so an interrupted (even killed) run continues where it stopped, and temporary files a killed run
left are removed when the folder is used again.

With --unet_path base and no --output_path, images go to outputs/base/<base model>/, one folder
per base model.
"""

from __future__ import annotations

if not __package__:  # run as a file (python eval/X.py): make the repository importable first
    import _as_file  # noqa: F401  (eval/_as_file.py)

import argparse
import hashlib
import os
import re

import torch
from PIL import ExifTags, Image
from tqdm.auto import tqdm

from eval import checks
from sdpo.files import (atomic_path, check_output_dir, first_difference,
                        path_identity, remove_stale_temps, write_json_atomic)
from eval.prompts import load_suite
from sdpo import families, flags, lora, models
from sdpo.conditioning import PromptEncoder
from sdpo.sampling import sample, vae_scale_factor
from sdpo.errors import InputError, reports_input_errors

RECORD_NAME = "generation.json"
PROTOCOL_VERSION = 1  # bump when the sampling code changes what images it makes
IMAGE_NAME = re.compile(r"(\d+)_(\d+)x(\d+)\.(png|mp4)")
FRAME_NAMES = ("first", "middle", "last")  # a video's frames saved as PNG beside it


def run_name(test_json: str, seed: int, height: int, width: int, steps: int, cfg: float,
             num_frames: int | None = None) -> str:
    suite = os.path.basename(test_json).split(".")[0]
    frames = f"_{num_frames}f" if num_frames else ""
    return f"{suite}_seed{seed}_{height}x{width}{frames}_{steps}s_{cfg}cfg"


def output_name(index: int, height: int, width: int, video: bool) -> str:
    return f"{index}_{height}x{width}.{'mp4' if video else 'png'}"


def frame_paths(video_path: str) -> list[str]:
    """The PNGs of a video's first, middle and last frames: <index>_<H>x<W>_<which>.png."""
    stem = video_path.removesuffix(".mp4")
    return [f"{stem}_{which}.png" for which in FRAME_NAMES]


def save_video_atomic(frames, prompt: str, path: str, fps: int) -> None:
    """A video as an mp4 (H.264) and its first, middle and last frames as PNG; the frames first, the
    mp4 last, each renamed into place, so a complete mp4 means a complete set."""
    from sdpo.video import encode_mp4

    for which, frame_path in zip((0, len(frames) // 2, len(frames) - 1), frame_paths(path)):
        save_png_atomic(Image.fromarray(frames[which]), prompt, frame_path)
    data = encode_mp4(frames, fps=fps)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def is_complete(path: str) -> bool:
    """An image that opens, or a video that decodes with its frame PNGs beside it."""
    if not path.endswith(".mp4"):
        return is_complete_png(path)
    from sdpo.video import UnreadableVideo, read_frames

    try:
        read_frames(path)
    except UnreadableVideo:
        return False
    return all(is_complete_png(p) for p in frame_paths(path))


def save_png_atomic(image: Image.Image, prompt: str, path: str) -> None:
    """Write a PNG under `<path>.tmp<pid>` (no .png at the end: no glob picks it up), then rename."""
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = prompt
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", exif=exif)


def is_complete_png(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # missing, truncated or not an image: generate it again
        return False


# ---- what made the images ------------------------------------------------------------------------


def base_folder_name(base: str) -> str:
    """A folder name for a base model, distinct for distinct bases: a hub id as owner--name, a
    local folder as its name plus a hash of its absolute path."""
    if os.path.exists(base):
        path = os.path.abspath(base)
        name = os.path.basename(os.path.normpath(path)) or "root"
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base.replace("/", "--"))


def default_output_path(args) -> str:
    if args.lora_path:  # beside the LoRA, as beside a checkpoint
        return args.lora_path
    if args.unet_path == "base":
        return os.path.join("outputs", "base", base_folder_name(args.pretrain_path))
    # as the reference: beside the checkpoint
    return args.unet_path if os.path.isdir(args.unet_path) else os.path.dirname(os.path.abspath(args.unet_path))


def model_identity(args) -> dict:
    """The base pipeline (the parts generation loads), the UNet and the VAE, as sdpo.files.path_identity."""
    base = args.pretrain_path
    if os.path.isdir(base):
        family = families.get(args.model_family)
        parts = ["tokenizer", "text_encoder", "scheduler", family.denoiser_folder]
        parts += [folder for pair in family.text_folders(args.no_t5)[1:] for folder in pair[:2]]
        parts += [] if args.vae_path else ["vae"]
        files = {}
        for part in parts:
            inner = path_identity(os.path.join(base, part)).get("files", {})
            files.update({f"{part}/{name}": value for name, value in inner.items()})
        pipeline = {"path": os.path.abspath(base), "files": files}
    else:
        pipeline = {"value": base}
    unet = "base" if args.unet_path == "base" else path_identity(
        (models.unet_folder(args.unet_path, families.get(args.model_family)) or args.unet_path)
        if os.path.isdir(args.unet_path) else args.unet_path)
    vae = None if args.vae_path is None else path_identity(args.vae_path)
    identity = {"pretrain_path": pipeline, "unet_path": unet, "vae_path": vae, "sdxl": args.sdxl}
    if args.no_t5:  # (absent without it: records written before --no_t5 stay valid)
        identity["no_t5"] = True
    if args.lora_path:  # (absent without one: records written before --lora_path stay valid)
        identity["lora_path"] = path_identity(os.path.join(args.lora_path, lora.LORA_WEIGHTS))
    return identity


def protocol(args) -> dict:
    family = families.get(args.model_family)
    record = {"version": PROTOCOL_VERSION, "scheduler": family.sampling_scheduler_name, "seed": args.seed,
              "steps": args.steps, "cfg": args.cfg, "height": args.height, "width": args.width, "dtype": args.dtype,
              "device": torch.device(args.device).type}
    if family.video:  # (absent for images: their records stay valid)
        record.update(num_frames=args.num_frames, fps=family.fps)
    return record


def read_record(path: str) -> tuple[dict | None, str | None]:
    """(the generation record, None), or (None, why it cannot be used)."""
    if not os.path.exists(path):
        return None, None
    try:
        record = checks.read_json(path, RECORD_NAME)
    except InputError as err:
        return None, f"its {RECORD_NAME} is unreadable ({err})"
    ok = (isinstance(record, dict) and isinstance(record.get("images"), dict)
          and all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in record["images"].items()))
    return (record, None) if ok else (None, f"its {RECORD_NAME} is not a generation record of this version")


# ---- sampling ------------------------------------------------------------------------------------


class Generator:
    """The sampling loop of the protocol over loaded components."""

    def __init__(self, base: str, unet_spec: str, family_name: str, no_t5: bool, vae_path: str | None, device: str,
                 dtype, lora_path: str | None = None):
        family = families.get(family_name)
        self.device, self.dtype = torch.device(device), dtype
        flag = "--pretrain_path"
        models.check_source(base, flag)
        # The scheduler first (the cheapest proof that the base loads), then the denoiser: a
        # checkpoint that does not fit fails before the rest is loaded.
        self.scheduler = models.load_scheduler(family.sampling_scheduler_class(), base, flag)
        self.unet = models.load_unet(unet_spec, base, "--unet_path", base_flag=flag, family=family)
        if lora_path:
            lora.load_diffusers_lora(self.unet, lora_path, prefix=family.denoiser_folder, name=family.denoiser_name)
        models.cast_frozen(self.unet, dtype).to(self.device).eval()
        self.vae = models.load_vae(base, vae_path, "--vae_path", flag, family=family).to(self.device, torch.float32).eval()
        tokenizers, encoders = models.load_text_side(base, family, flag, no_t5=no_t5)
        for encoder in encoders:
            encoder.to(self.device, dtype).eval()
        self.prompt_encoder = PromptEncoder(family, tokenizers, encoders, 0, self.unet.config, sampling=True)
        self.batches = family.batch_invariant
        self.pipeline = None
        if family.video:  # sampled by the pipeline itself, over the parts loaded here
            import diffusers

            # The VAE decodes in fp32 (the protocol); CogVideoXPipeline hands it latents in the
            # transformer's dtype without a cast (WanPipeline casts), so the cast is made here.
            decode, vae = self.vae.decode, self.vae
            vae.decode = lambda latents, *args, **kwargs: decode(latents.to(vae.dtype), *args, **kwargs)
            self.pipeline = getattr(diffusers, family.pipeline_class)(
                tokenizer=tokenizers[0], text_encoder=encoders[0], vae=self.vae, transformer=self.unet,
                scheduler=self.scheduler)
            self.pipeline.set_progress_bar_config(disable=True)

    def __call__(self, prompts: list[str], height: int, width: int, steps: int, cfg: float, seed: int,
                 num_frames: int | None = None):
        if self.pipeline is not None:
            return [self.video(p, height, width, num_frames, steps, cfg, seed) for p in prompts]
        groups = [prompts] if self.batches else [[p] for p in prompts]  # see Family.batch_invariant
        return [image for group in groups for image in sample(self.unet, self.vae, self.prompt_encoder, self.scheduler,
                                                              group, height, width, steps, cfg, seed, self.dtype)]

    @torch.no_grad()
    def video(self, prompt: str, height: int, width: int, num_frames: int, steps: int, cfg: float, seed: int):
        """One video as (F, H, W, 3) uint8 frames: the pipeline's sampling with its scheduler, the
        empty negative prompt, guidance_scale = cfg + 1 (our formula, see above), and noise from a
        generator seeded with the seed on the sampling device, for every prompt."""
        generator = torch.Generator(self.device).manual_seed(seed)
        frames = self.pipeline(prompt=prompt, negative_prompt="", height=height, width=width, num_frames=num_frames,
                               num_inference_steps=steps, guidance_scale=cfg + 1.0, generator=generator,
                               output_type="np").frames[0]
        return (frames * 255).round().clip(0, 255).astype("uint8")


# ---- the command ---------------------------------------------------------------------------------


def check_args(args) -> None:
    """Every flag checked, and the output folder made and proven writable, before any model loads."""
    checks.at_least_one(args.steps, "--steps")
    checks.at_least_one(args.batch_size, "--batch_size")
    checks.at_least_one(args.max_prompts, "--max_prompts")
    flags.image_size(args.height, "--height")
    flags.image_size(args.width, "--width")
    family = families.get(args.model_family)
    for flag, size in (("--height", args.height), ("--width", args.width)):
        checks.check(size % family.size_multiple == 0, f"{flag} {size}: {family.label} takes sizes that are multiples "
                                                      f"of {family.size_multiple}")
    checks.seed(args.seed)
    checks.guidance(args.cfg)
    args.device = flags.device(args.device)
    if args.dtype is None:
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    family = models.check_base(args.pretrain_path, args.sdxl, "--pretrain_path")
    checks.check(not (args.no_t5 and not family.optional_t5),
                 f"--no_t5: {args.pretrain_path} is {family.article} {family.label} pipeline, which has no T5 encoder")
    if args.lora_path is None and lora.is_lora_folder(args.unet_path) and not models.unet_folder(args.unet_path, family):
        args.unet_path, args.lora_path = "base", args.unet_path  # a LoRA folder given where a checkpoint goes
    if args.lora_path is not None:
        checks.check(lora.is_lora_folder(args.lora_path),
                     f"--lora_path {args.lora_path}: not a folder holding {lora.LORA_WEIGHTS} (a train.py --use_lora "
                     f"output folder)")
        check_lora_base(args)
    checks.check(args.unet_path == "base" or os.path.exists(args.unet_path),
                 f"--unet_path {args.unet_path!r}: not found (give 'base', a folder, a .safetensors or a .pth file)")
    if args.vae_path is not None and not os.path.isdir(args.vae_path):
        checks.check(not os.path.exists(args.vae_path), f"--vae_path {args.vae_path}: a file; a VAE folder is needed")
        checks.check(models.HUB_ID.fullmatch(args.vae_path) is not None,
                     f"--vae_path {args.vae_path!r}: no such folder, and not a hub id (owner/name)")
    # Configs and shapes only, no weight loads: a pipeline or VAE folder that lacks a part fails here.
    models.check_pipeline(args.pretrain_path, family, args.vae_path, "--pretrain_path", "--vae_path", no_t5=args.no_t5)
    models.check_unet(args.unet_path, args.pretrain_path, "--unet_path", family)
    check_steps(args.steps, args.pretrain_path, family)
    args.suite = load_suite(args.test_json)
    if args.output_path is None:
        args.output_path = default_output_path(args)
    check_output_dir(args.output_path, "--output_path")
    if family.video:
        checks.at_least_one(args.num_frames, "--num_frames")
        try:
            family.check_num_frames(args.num_frames, models.vae_config(args.pretrain_path, args.vae_path, family,
                                                                         "--pretrain_path", "--vae_path"),
                                    models.base_unet_shapes(args.pretrain_path, "--pretrain_path", family).config)
        except ValueError as err:
            raise InputError(f"--num_frames {args.num_frames}: {err}") from None
    else:
        checks.check(args.num_frames is None, f"--num_frames is for video models; {args.pretrain_path} is "
                                              f"{family.article} {family.label} pipeline")
    name = run_name(args.test_json, args.seed, args.height, args.width, args.steps, args.cfg, args.num_frames)
    args.image_dir = check_output_dir(os.path.join(args.output_path, name), "--output_path")


def same_model(a: str, b: str, family) -> bool | None:
    """Whether two model sources name the same model: equal strings, or local paths to the same
    folder or file (a train.py output dir and its unet/ count as one); None when one is local and
    the other a hub id (a local copy of a hub model cannot be told apart)."""
    if a == b:
        return True
    if "base" in (a, b):  # the base pipeline's own UNet, and another one
        return False
    local_a, local_b = os.path.exists(a), os.path.exists(b)
    if local_a and local_b:
        where = [models.unet_folder(p, family) or p if os.path.isdir(p) else p for p in (a, b)]
        return os.path.samefile(*where)
    return None if local_a != local_b else False


def check_lora_base(args) -> None:
    """A LoRA that train.py wrote records what it was trained on (train_config.json beside it): it
    is refused on another base pipeline or UNet. (A LoRA from elsewhere has only its shapes checked.)"""
    path = os.path.join(args.lora_path, "train_config.json")
    if not os.path.isfile(path):
        return
    config = checks.read_json(path, "--lora_path")
    base, unet = config.get("pretrained_model_name_or_path"), config.get("unet_init") or "base"
    if not isinstance(base, str):
        return
    for flag, trained, given in (("--pretrain_path", base, args.pretrain_path), ("--unet_path", unet, args.unet_path)):
        same = same_model(trained, given, families.get(args.model_family))
        if same is False:
            raise InputError(f"--lora_path {args.lora_path} was trained on {base}" +
                             (f" with --unet_init {unet}" if unet != "base" else "") +
                             f", not on {flag} {given}; generate with --pretrain_path {base} --unet_path {unet}")
        if same is None:
            print(f"warning: --lora_path {args.lora_path} was trained on {flag} {trained}; generating on {given}, "
                  f"which may be the same model")


def check_steps(steps: int, base: str, family) -> None:
    """At most as many sampling steps as the scheduler has training timesteps: beyond that, steps
    repeat timesteps (or round to 0) and the run only costs time."""
    config = models.load_scheduler(family.sampling_scheduler_class(), base, "--pretrain_path").config
    try:
        families.check_static_shift(config)
    except ValueError as err:
        raise InputError(f"--pretrain_path {base}: its scheduler: {err}") from None
    limit = config.num_train_timesteps
    checks.check(steps <= limit, f"--steps must be at most {limit}, the scheduler's training timesteps, got {steps}")


def generate(args, loaded: dict | None = None) -> str:
    """Generate the suite's missing or stale images and write the manifest; returns its path.
    `loaded` keeps the models between calls (eval.evaluate runs one call per suite)."""
    if getattr(args, "image_dir", None) is None:
        check_args(args)
    suite = args.suite if args.max_prompts is None else args.suite[: args.max_prompts]
    image_dir = args.image_dir
    name = os.path.basename(image_dir)
    for folder in (image_dir, args.output_path):
        removed = remove_stale_temps(folder)
        if removed:
            print(f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted run")

    # What made the images already there, and which of them this run can keep.
    record_path = os.path.join(image_dir, RECORD_NAME)
    identity = {"model": model_identity(args), "protocol": protocol(args)}
    old, reason = read_record(record_path)
    vouched: dict[str, str] = {}
    if args.recompute:
        reason = "--recompute"
    elif old is not None:
        diff = first_difference({k: old.get(k) for k in identity}, identity)
        if diff:
            reason = f"its images were made by another model or protocol ({diff})"
        else:
            vouched = dict(old["images"])
    video = families.get(args.model_family).video
    extension = "mp4" if video else "png"
    present = {m.group(1) for m in map(IMAGE_NAME.fullmatch, os.listdir(image_dir))
               if m and (int(m.group(2)), int(m.group(3)), m.group(4)) == (args.height, args.width, extension)}
    if old is None and reason is None and present:
        reason = f"it has images but no {RECORD_NAME} saying what made them"
    manifest, todo, changed = [], [], 0
    for index, entry in enumerate(suite):
        path = os.path.join(image_dir, output_name(index, args.height, args.width, video))
        manifest.append({"prompt": entry["prompt"], "gen_image_path": path,
                         "raw_image_path": entry.get("raw_image_path", ""), "metadata": entry.get("metadata", {})})
        made_for = vouched.pop(str(index), None)
        if made_for is not None and made_for != entry["prompt"]:
            changed += 1
        if made_for != entry["prompt"] or not is_complete(path):
            todo.append(index)
    # Kept: the images of this run that the record vouches for, and those of earlier, longer runs
    # (beyond this run's prompts) that it vouches for. Every other image file goes now, so the
    # folder never holds an image its record does not vouch for.
    keep = {k: v for k, v in vouched.items() if k in present}
    pending = set(todo)
    keep.update({str(i): suite[i]["prompt"] for i in range(len(suite)) if i not in pending})
    generator = None
    if todo:  # loaded before anything on disk changes: a model that fails to load leaves the folder as it was
        dtype = models.DTYPES[args.dtype]
        key = (args.pretrain_path, args.unet_path, args.model_family, args.no_t5, args.vae_path, args.device, dtype,
               args.lora_path)
        loaded = {} if loaded is None else loaded
        if key not in loaded:
            loaded.clear()  # one set of models in memory at a time
            loaded[key] = Generator(*key)
        generator = loaded[key]
        scale = 8 if video else vae_scale_factor(generator.vae)  # (the video VAEs' spatial factor is 8)
        for flag, size in (("--height", args.height), ("--width", args.width)):
            checks.check(size % scale == 0, f"{flag} {size}: not a multiple of this VAE's downsampling factor {scale}")
    if reason or changed:
        why = reason or f"{changed} prompt(s) of the suite changed since their images were made"
        print(f"{image_dir}: {why}; generating {len(todo)} image(s) again")
    write_json_atomic({**identity, "images": dict(sorted(keep.items(), key=lambda kv: int(kv[0])))}, record_path)
    for index in sorted(present - set(keep), key=int):
        path = os.path.join(image_dir, output_name(int(index), args.height, args.width, video))
        for stale in [path, *(frame_paths(path) if video else [])]:
            if os.path.exists(stale):
                os.remove(stale)

    if generator is not None:
        for start in tqdm(range(0, len(todo), args.batch_size), desc=name, unit="batch"):
            batch = todo[start : start + args.batch_size]
            images = generator([suite[i]["prompt"] for i in batch], args.height, args.width, args.steps,
                               args.cfg, args.seed, args.num_frames)
            for i, image in zip(batch, images):
                if video:
                    save_video_atomic(image, suite[i]["prompt"], manifest[i]["gen_image_path"],
                                      families.get(args.model_family).fps)
                else:
                    save_png_atomic(image, suite[i]["prompt"], manifest[i]["gen_image_path"])
                keep[str(i)] = suite[i]["prompt"]
            # After the images: a kill in between leaves images the record does not vouch for (made again).
            write_json_atomic({**identity, "images": dict(sorted(keep.items(), key=lambda kv: int(kv[0])))},
                              record_path)
    manifest_path = image_dir + ".json"
    write_json_atomic(manifest, manifest_path)
    print(f"{len(suite) - len(todo)} images kept, {len(todo)} generated; manifest: {manifest_path}")
    return manifest_path


def add_generation_flags(p) -> None:
    p.add_argument("--unet_path", required=True,
                   help="unet.pth / .safetensors / diffusers folder / 'base' / a LoRA folder (as --lora_path on base)")
    p.add_argument("--lora_path", default=None,
                   help="a LoRA folder (train.py --use_lora output, diffusers' format) applied on top of --unet_path")
    p.add_argument("--pretrain_path", default=None,
                   help="base pipeline (default: SD1.5, or SDXL base with --sdxl); its model_index.json decides the "
                        "family (SD1.x, SDXL, SD3/SD3.5)")
    p.add_argument("--vae_path", default=None, help="a separate VAE (default for SDXL: madebyollin/sdxl-vae-fp16-fix)")
    p.add_argument("--sdxl", action="store_true")
    p.add_argument("--no_t5", action="store_true", help="SD3: sample without the T5 text encoder (text_encoder_3=None)")
    p.add_argument("--output_path", default=None,
                   help="parent of the image folder (default: beside the checkpoint; for base, outputs/base/<base model>)")
    p.add_argument("--height", type=int, default=None, help="a multiple of 8; default 512, SDXL and SD3 1024")
    p.add_argument("--width", type=int, default=None, help="a multiple of 8; default 512, SDXL and SD3 1024")
    p.add_argument("--num_frames", type=int, default=None,
                   help="video models: frames per video, 4k + 1 (default: the pipeline's, Wan2.1 81, CogVideoX 49)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; SD3: 28, its pipeline's)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance: cond + cfg (cond - uncond), the reference's formula; diffusers' guidance_scale "
                        "is cfg + 1 (7.5 here is 8.5 there); 0 is no guidance, negative values are refused "
                        "(default 7.5; SD3: 6, its pipeline's guidance_scale 7)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch (images do not depend on it)")
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts, for a quick look")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="UNet/text encoders (default bf16 on GPU, fp32 on CPU)")


def finish_args(args):
    if args.pretrain_path is None:
        args.pretrain_path = families.get("sdxl" if args.sdxl else "sd15").default_pipeline
    family = families.resolve(args.pretrain_path, args.sdxl, "--pretrain_path", strict=False)
    args.model_family = family.name
    default_size = family.size if family.video else (family.resolution, family.resolution)
    args.height = default_size[0] if args.height is None else args.height
    args.width = default_size[1] if args.width is None else args.width
    if family.video and args.num_frames is None:
        args.num_frames = family.num_frames
    args.steps = family.sampling_steps if args.steps is None else args.steps
    args.cfg = family.sampling_cfg if args.cfg is None else args.cfg
    if args.vae_path is None:
        args.vae_path = family.default_vae
    args.image_dir = args.suite = None
    return args


def parse_args(argv=None):
    p = checks.Parser(prog="python -m eval.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_flags(p)
    p.add_argument("--test_json", default="prompts/papv2.json", help="a prompt suite file")
    p.add_argument("--recompute", action="store_true", help="make every image again, keeping none")
    return finish_args(p.parse_args(argv))


@reports_input_errors
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    return generate(args)


if __name__ == "__main__":
    main()
