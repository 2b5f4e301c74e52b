"""The real SD1.5 and SDXL architectures, built from the configs in `sdpo/configs/` with random
weights and no download: for the benchmark, and wherever the real sizes matter but not the weights.

The configs are those of the released pipelines (stable-diffusion-v1-5 and
stable-diffusion-xl-base-1.0): the SD1.5 UNet has 859.5 M parameters, SDXL's 2,567.5 M, the VAE
83.7 M, the CLIP-L text encoder 123.1 M and SDXL's second (OpenCLIP bigG) one 694.7 M. The
tokenizers are the real CLIP tokenizer, built offline (`sdpo.tiny.write_clip_tokenizer`).

Built under `torch.device("meta")`, the models take no memory: enough to count FLOPs.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
ARCHITECTURES = ("sd15", "sdxl")


def config(arch: str, part: str) -> dict:
    with open(os.path.join(CONFIG_DIR, arch, f"{part}.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def tokenizers(arch: str):
    """The real CLIP tokenizer (SDXL's second one pads with "!", as released)."""
    from sdpo.tiny import load_clip_tokenizer, write_clip_tokenizer

    folder = tempfile.mkdtemp(prefix="clip-tokenizer-")
    write_clip_tokenizer(folder)
    found = [load_clip_tokenizer(folder)]
    if arch == "sdxl":
        write_clip_tokenizer(folder + "-2", pad_token="!")
        found.append(load_clip_tokenizer(folder + "-2"))
    return found


def text_encoders(arch: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = [CLIPTextModel(CLIPTextConfig(**config(arch, "text_encoder")))]
    if arch == "sdxl":
        parts.append(CLIPTextModelWithProjection(CLIPTextConfig(**config(arch, "text_encoder_2"))))
    return parts


def vae(arch: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config(arch, "vae"))


def unet(arch: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config(arch, "unet"))


def build(arch: str, with_reference: bool = True, device: str | torch.device = "cpu", seed: int = 0):
    """(tokenizers, text encoders, VAE, policy UNet, reference UNet or None), as train.load_models
    returns them, with random weights (the reference a copy of the policy), on `device`."""
    import copy

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        encoders, autoencoder, policy = text_encoders(arch), vae(arch), unet(arch)
    reference = copy.deepcopy(policy) if with_reference else None
    return tokenizers(arch), encoders, autoencoder, policy, reference


def save_pipeline(arch: str, folder: str, seed: int = 0) -> str:
    """The architecture with random weights, saved as a pipeline folder in the hub layout (what
    train.py, the reference's train.py and diffusers' pipelines load); SD1.5 is about 4 GB."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    toks, encoders, autoencoder, policy, _ = build(arch, with_reference=False, seed=seed)
    scheduler = DDPMScheduler.from_config(config(arch, "scheduler"))
    if arch == "sd15":
        pipe = StableDiffusionPipeline(vae=autoencoder, text_encoder=encoders[0], tokenizer=toks[0], unet=policy,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=autoencoder, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=toks[0], tokenizer_2=toks[1], unet=policy, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder
