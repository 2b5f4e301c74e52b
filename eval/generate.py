"""Generate images for a prompt suite with the reference's protocol (docs/methods.md, section
"Evaluation protocol").

    python -m eval.generate --unet_path CKPT --test_json prompts/papv2.json [--sdxl] [--batch_size 16]

CKPT is a reference-style unet.pth state dict, a .safetensors state dict, a diffusers folder
(a train.py output dir or a unet/ folder), or `base` for the unmodified base model.

Protocol:
- Euler discrete sampling, 50 steps, seed 0, 512x512 (SD1.5) or 1024x1024 (SDXL).
- The UNet and text encoders run in bf16 (fp32 on CPU) and the VAE decodes in fp32.
- Every prompt starts from the same initial noise: a generator seeded with the seed, per prompt.
  So images do not depend on the batch size.
- The negative branch is the encoded empty prompt. Guidance is
  pred_cond + cfg * (pred_cond - pred_uncond), with cfg = 7.5.

Output, named as the reference names it:
- the folder <output_path>/<suite>_seed<S>_<H>x<W>_<steps>s_<cfg>cfg/, holding <index>_<H>x<W>.png
  with the prompt in the EXIF ImageDescription;
- the manifest <same name>.json: the suite's records with gen_image_path filled in.

Images already on disk are kept and skipped, and every file is written atomically, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import ExifTags, Image
from tqdm.auto import tqdm

from eval.files import write_json_atomic
from eval.prompts import load_suite
from sdpo import models
from sdpo.conditioning import PromptEncoder
from sdpo.errors import reports_input_errors

MANIFEST_KEYS = ("prompt", "gen_image_path", "raw_image_path", "metadata")


def run_name(test_json: str, seed: int, height: int, width: int, steps: int, cfg: float) -> str:
    suite = os.path.basename(test_json).split(".")[0]
    return f"{suite}_seed{seed}_{height}x{width}_{steps}s_{cfg}cfg"


def save_png_atomic(image: Image.Image, prompt: str, path: str) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = prompt
    tmp = f"{path}.tmp{os.getpid()}.png"
    image.save(tmp, exif=exif)
    os.replace(tmp, path)


def is_complete_png(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # missing, truncated or not an image: generate it again
        return False


class Generator:
    """The sampling loop of the protocol over loaded components."""

    def __init__(self, base: str, unet_spec: str, sdxl: bool, vae_path: str | None, device: str, dtype):
        from diffusers import EulerDiscreteScheduler

        self.device, self.dtype = torch.device(device), dtype
        flag = "--pretrain_path"
        models.check_source(base, flag)
        tokenizers, encoders = models.load_text_side(base, sdxl, flag)
        for encoder in encoders:
            encoder.to(self.device, dtype).eval()
        self.prompt_encoder = PromptEncoder(tokenizers, encoders, resolution=0)
        self.scheduler = models.load_scheduler(EulerDiscreteScheduler, base, flag)
        self.vae = models.load_vae(base, vae_path, "--vae_path", flag).to(self.device, torch.float32).eval()
        self.unet = models.load_unet(unet_spec, base, "--unet_path").to(self.device, dtype).eval()
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def initial_noise(self, count: int, height: int, width: int, seed: int) -> torch.Tensor:
        """The same noise for every prompt: a fresh generator per prompt, on the run's device."""
        shape = (1, self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        return torch.cat([
            torch.randn(shape, generator=torch.Generator(self.device).manual_seed(seed), device=self.device,
                        dtype=self.dtype)
            for _ in range(count)
        ])

    @torch.no_grad()
    def __call__(self, prompts: list[str], height: int, width: int, steps: int, cfg: float, seed: int):
        n = len(prompts)
        cond = self.prompt_encoder(prompts, self.device, self.dtype, size=(height, width))
        uncond = self.prompt_encoder([""], self.device, self.dtype, size=(height, width)).repeat(n)
        both = {k: None if v is None else torch.cat([v, getattr(uncond, k)])
                for k, v in vars(cond).items()}  # conditional first, then the empty prompt
        kwargs = type(cond)(**both).unet_kwargs()
        self.scheduler.set_timesteps(steps, device=self.device)
        latents = self.initial_noise(n, height, width, seed) * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            model_input = self.scheduler.scale_model_input(latents, t).repeat(2, 1, 1, 1)
            pred = self.unet(model_input, t, **kwargs).sample
            pred_cond, pred_uncond = pred.chunk(2)
            guided = pred_cond + cfg * (pred_cond - pred_uncond)
            latents = self.scheduler.step(guided, t, latents).prev_sample
        x = latents.float() / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None) is not None:
            x = x + self.vae.config.shift_factor
        x = self.vae.decode(x).sample
        x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((im * 255).round().astype("uint8")) for im in x]


def generate(args) -> str:
    """Generate the suite's missing images and write the manifest; returns the manifest's path."""
    suite = load_suite(args.test_json)
    if args.max_prompts is not None:
        suite = suite[: args.max_prompts]
    output_path = args.output_path
    if output_path is None:  # as the reference: beside the checkpoint
        output_path = args.unet_path if os.path.isdir(args.unet_path) else os.path.dirname(os.path.abspath(args.unet_path))
        if args.unet_path == "base":
            output_path = os.path.join("outputs", "base")
    name = run_name(args.test_json, args.seed, args.height, args.width, args.steps, args.cfg)
    image_dir = os.path.join(output_path, name)
    os.makedirs(image_dir, exist_ok=True)

    manifest, todo = [], []
    for index, entry in enumerate(suite):
        path = os.path.join(image_dir, f"{index}_{args.height}x{args.width}.png")
        manifest.append({"prompt": entry["prompt"], "gen_image_path": path,
                         "raw_image_path": entry.get("raw_image_path", ""), "metadata": entry.get("metadata", {})})
        if not is_complete_png(path):
            todo.append(index)
    if todo:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
        generator = Generator(args.pretrain_path, args.unet_path, args.sdxl, args.vae_path, device, dtype)
        for start in tqdm(range(0, len(todo), args.batch_size), desc=name, unit="batch"):
            batch = todo[start : start + args.batch_size]
            images = generator([suite[i]["prompt"] for i in batch], args.height, args.width, args.steps,
                               args.cfg, args.seed)
            for i, image in zip(batch, images):
                save_png_atomic(image, suite[i]["prompt"], manifest[i]["gen_image_path"])
    manifest_path = image_dir + ".json"
    write_json_atomic(manifest, manifest_path)
    print(f"{len(suite) - len(todo)} images kept, {len(todo)} generated; manifest: {manifest_path}")
    return manifest_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet_path", required=True, help="unet.pth / .safetensors / diffusers folder / 'base'")
    p.add_argument("--test_json", default="prompts/papv2.json", help="a prompt suite file")
    p.add_argument("--pretrain_path", default=None, help="base pipeline (default: SD1.5, or SDXL base with --sdxl)")
    p.add_argument("--vae_path", default=None, help="a separate VAE (default for SDXL: madebyollin/sdxl-vae-fp16-fix)")
    p.add_argument("--sdxl", action="store_true")
    p.add_argument("--output_path", default=None, help="parent of the image folder (default: beside the checkpoint)")
    p.add_argument("--height", type=int, default=None, help="default 512, SDXL 1024")
    p.add_argument("--width", type=int, default=None, help="default 512, SDXL 1024")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch (images do not depend on it)")
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts, for a quick look")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="UNet/text encoders (default bf16 on GPU, fp32 on CPU)")
    args = p.parse_args(argv)
    size = 1024 if args.sdxl else 512
    args.height, args.width = args.height or size, args.width or size
    if args.pretrain_path is None:
        args.pretrain_path = ("stabilityai/stable-diffusion-xl-base-1.0" if args.sdxl
                              else "stable-diffusion-v1-5/stable-diffusion-v1-5")
    if args.sdxl and args.vae_path is None:
        args.vae_path = "madebyollin/sdxl-vae-fp16-fix"
    return args


@reports_input_errors
def main(argv=None):
    return generate(parse_args(argv))


if __name__ == "__main__":
    main()
