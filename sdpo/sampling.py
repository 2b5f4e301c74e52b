"""Text-to-image sampling with the reference's evaluation protocol, over components already loaded.

Euler discrete sampling (SD3: the flow-matching Euler scheduler of its pipeline); every prompt starts from the same noise, drawn from a generator seeded
with `seed` for each prompt on the sampling device (so an image does not depend on the batch it is
in); the negative branch is the encoded empty prompt; guidance is
pred_cond + cfg * (pred_cond - pred_uncond); the VAE decodes in fp32.
"""

from __future__ import annotations

import torch
from PIL import Image


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def initial_noise(count: int, channels: int, height: int, width: int, scale: int, seed: int, device, dtype):
    """The same noise for every prompt: one draw from a generator seeded with `seed` on `device`,
    repeated (what a fresh generator per prompt would draw)."""
    shape = (1, channels, height // scale, width // scale)
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype).repeat(count, 1, 1, 1)


@torch.no_grad()
def sample(unet, vae, prompt_encoder, scheduler, prompts: list[str], height: int, width: int, steps: int,
           cfg: float, seed: int, dtype) -> list[Image.Image]:
    """Images for `prompts`; the denoiser and text encoders run in `dtype`, the VAE in its own (fp32).
    The prompt encoder's family says how the denoiser is called and how latents are normalised."""
    family = prompt_encoder.family
    device = next(unet.parameters()).device
    n = len(prompts)
    cond = prompt_encoder(prompts, device, dtype, size=(height, width))
    both = cond.cat(prompt_encoder([""], device, dtype, size=(height, width)).repeat(n))  # conditional first
    scheduler.set_timesteps(steps, device=device)
    latents = initial_noise(n, unet.config.in_channels, height, width, vae_scale_factor(vae), seed, device, dtype)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching has no input scaling
    for t in scheduler.timesteps:
        model_input = scale_input(latents, t).repeat(2, 1, 1, 1)
        pred = unet(**family.model_inputs(model_input, t, both, unet.config)).sample
        pred_cond, pred_uncond = pred.chunk(2)
        guided = pred_cond + cfg * (pred_cond - pred_uncond)
        latents = scheduler.step(guided, t, latents).prev_sample
    x = family.denormalize(latents.float(), *family.latent_norm(vae.config))
    x = vae.decode(x.to(vae.dtype)).sample.float()
    x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in x]
