"""The offline tiny video pipelines (sdpo/tiny.py) and the released video configs (sdpo/configs/):
a tiny Wan2.1-style and a tiny CogVideoX-style pipeline, real diffusers and transformers classes
with tiny random weights and a tokenizer built offline, load with WanPipeline and
CogVideoXPipeline and generate reproducibly; the shipped configs of Wan2.1-T2V-1.3B, CogVideoX-2B
and CogVideoX-5B build the released architectures (parameter counts) on the meta device."""

import json
import os

import numpy as np
import pytest
import torch

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sdpo", "configs")


@pytest.fixture
def video(tiny_video):
    return tiny_video


@pytest.mark.parametrize("name,frames,latent_frames", [("wan21", 5, 2), ("cogvideox", 9, 3)])
def test_the_tiny_video_pipelines_load_and_generate(video, name, frames, latent_frames):
    import diffusers

    cls = {"wan21": diffusers.WanPipeline, "cogvideox": diffusers.CogVideoXPipeline}[name]
    pipe = cls.from_pretrained(video[name])

    def clip(seed):
        return pipe("a red cat", height=32, width=32, num_frames=frames, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).frames[0]

    a = clip(0)
    assert a.shape == (frames, 32, 32, 3) and np.isfinite(a).all()
    assert np.array_equal(a, clip(0)) and not np.array_equal(a, clip(1))
    # The VAE compresses 4x in time (the first frame alone) and 8x in space.
    pixels = torch.zeros(1, 3, frames, 32, 32)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean
    assert latents.shape == (1, 4, latent_frames, 4, 4)
    ids = pipe.tokenizer("A red cat").input_ids
    assert ids[-1] == pipe.tokenizer.eos_token_id == 1 and pipe.tokenizer.unk_token_id not in ids


def config(arch, part):
    with open(os.path.join(CONFIGS, arch, f"{part}.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


@pytest.mark.parametrize("arch,part,cls,millions", [
    ("wan21", "transformer", "WanTransformer3DModel", 1419.00),
    ("wan21", "vae", "AutoencoderKLWan", 126.89),
    ("wan21", "text_encoder", "UMT5EncoderModel", 5680.91),
    ("cogvideox", "transformer", "CogVideoXTransformer3DModel", 1693.78),
    ("cogvideox", "vae", "AutoencoderKLCogVideoX", 215.58),
    ("cogvideox5b", "transformer", "CogVideoXTransformer3DModel", 5570.28),
    ("cogvideox5b", "text_encoder", "T5EncoderModel", 4762.31),
])
def test_the_released_video_configs_build_the_released_sizes(arch, part, cls, millions):
    import diffusers
    import transformers

    with torch.device("meta"):
        if hasattr(diffusers, cls):
            model = getattr(diffusers, cls).from_config(config(arch, part))
        else:
            model_cls = getattr(transformers, cls)
            model = model_cls(model_cls.config_class(**config(arch, part)))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    if part == "vae" and arch == "wan21":  # per-channel latent normalisation, as WanPipeline applies it
        assert len(model.config.latents_mean) == len(model.config.latents_std) == model.config.z_dim == 16
