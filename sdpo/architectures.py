"""The real SD1.5, SDXL, SD3.5-medium, Wan2.1-T2V-1.3B, CogVideoX-2B and -5B architectures, built from the configs in `sdpo/configs/`
with random weights and no download: for the benchmark, and wherever the real sizes matter but not
the weights.

The configs are those of the released pipelines (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0
and stable-diffusion-3.5-medium): the SD1.5 UNet has 859.5 M parameters, SDXL's 2,567.5 M, the VAE
83.7 M, the CLIP-L text encoder 123.1 M and SDXL's second (OpenCLIP bigG) one 694.7 M. SD3.5-medium's
transformer has 2,243.2 M parameters (2,469.7 M with its fixed position embedding, a buffer here),
its VAE (16 channels) 83.8 M, its CLIP-L and bigG with projections 123.7 M and 694.7 M, and its
T5-v1.1-XXL encoder 4,762.3 M. Wan2.1-T2V-1.3B's transformer has 1,419.0 M parameters, its VAE
126.9 M and its UMT5-XXL encoder 5,680.9 M; CogVideoX-2B's transformer 1,693.8 M and its VAE
215.6 M, CogVideoX-5B's transformer 5,570.3 M; both use T5-v1.1-XXL. The CLIP tokenizers are the
real one, built offline (`sdpo.tiny.write_clip_tokenizer`); the T5 and UMT5 tokenizers are a small
offline stand-in (the FLOPs do not depend on the ids).

Built under `torch.device("meta")`, the models take no memory: enough to count FLOPs.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
ARCHITECTURES = ("sd15", "sdxl", "sd3", "wan21", "cogvideox", "cogvideox5b")
FAMILY_OF = {"cogvideox5b": "cogvideox"}  # architectures that are a size of another family


def family(arch: str):
    """The model family of an architecture (sdpo.families)."""
    from sdpo import families

    return families.get(FAMILY_OF.get(arch, arch))


def config(arch: str, part: str) -> dict:
    with open(os.path.join(CONFIG_DIR, arch, f"{part}.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def tokenizers(arch: str):
    """The real CLIP tokenizer (the second one pads with "!", as released) and, for SD3, a T5-style
    tokenizer built offline (a small vocabulary: the FLOPs of T5 do not depend on the ids)."""
    from sdpo.tiny import load_clip_tokenizer, write_clip_tokenizer, write_t5_tokenizer

    folder = tempfile.mkdtemp(prefix="clip-tokenizer-")
    found = []
    for n, (name, _, _) in enumerate(family(arch).text_folders()):
        path = f"{folder}-{n}"
        if name == "tokenizer_3" or family(arch).video:
            from transformers import AutoTokenizer

            write_t5_tokenizer(path, model_max_length=512)  # (T5's, UMT5's: a small stand-in vocabulary)
            found.append(AutoTokenizer.from_pretrained(path))
        else:
            write_clip_tokenizer(path, **({"pad_token": "!"} if n else {}))
            found.append(load_clip_tokenizer(path))
    return found


def text_encoders(arch: str):
    import transformers

    parts = []
    for _, name, cls in family(arch).text_folders():
        model = getattr(transformers, cls)
        parts.append(model(model.config_class(**config(arch, name))))
    return parts


def vae(arch: str):
    import diffusers

    return getattr(diffusers, family(arch).vae_class_name).from_config(config(arch, "vae"))


def unet(arch: str):
    """The denoiser: a UNet (SD1.5, SDXL) or SD3's transformer."""
    fam = family(arch)
    return fam.denoiser_class().from_config(config(arch, fam.denoiser_folder))


def build(arch: str, with_reference: bool = True, device: str | torch.device = "cpu", seed: int = 0):
    """(tokenizers, text encoders, VAE, policy denoiser, reference or None), as train.load_models
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
    import diffusers

    fam = family(arch)
    toks, encoders, autoencoder, policy, _ = build(arch, with_reference=False, seed=seed)
    if fam.video:  # the scheduler the released pipeline ships (Wan2.1: UniPC with flow sigmas)
        with open(os.path.join(CONFIG_DIR, arch, "scheduler.json")) as f:
            shipped = json.load(f)["_class_name"]
        scheduler = getattr(diffusers, shipped).from_config(config(arch, "scheduler"))
    else:
        scheduler = fam.noise_scheduler_class().from_config(config(arch, "scheduler"))
    parts = {"vae": autoencoder, fam.denoiser_folder: policy, "scheduler": scheduler}
    for (tok_name, enc_name, _), tokenizer, encoder in zip(fam.text_folders(), toks, encoders):
        parts.update({tok_name: tokenizer, enc_name: encoder})
    parts.update(fam.pipeline_extras)
    getattr(diffusers, fam.pipeline_class)(**parts).save_pretrained(folder)
    return folder
