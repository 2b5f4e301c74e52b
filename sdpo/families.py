"""Model families: what differs between SD1.5, SDXL, SD3/SD3.5, Wan2.1 and CogVideoX, in one object each.

A family owns everything about a pipeline that the training step and generation must not know:
which pipeline folders it reads (the denoiser in `unet/` or `transformer/`, its tokenizers and
text encoders), how a caption becomes the denoiser's keyword arguments, how latents are normalised
(shift and scale), which noise process it was trained with, its defaults (resolution, VAE dtype,
memory savers, sampling steps and guidance) and DSPO's form. The rest of the project asks the
family; no other module tests which family it holds.

- SD1.5 (`StableDiffusionPipeline`): a UNet, one CLIP text encoder (last hidden state), DDPM
  with epsilon or v prediction, 512 px.
- SDXL (`StableDiffusionXLPipeline`): a UNet, two CLIP encoders (penultimate hidden states
  concatenated, the second's pooled embedding) and micro-conditioning time ids, DDPM, 1024 px.
- SD3/SD3.5 (`StableDiffusion3Pipeline`): an MMDiT (`SD3Transformer2DModel`), two CLIP encoders
  with projections and T5 (CLIP's penultimate states concatenated and zero-padded to T5's width,
  then T5's states appended on the sequence axis; the pooled embeddings of both CLIPs
  concatenated), or zeros where T5 is left out (`--no_t5`, as `text_encoder_3=None`), rectified
  flow (sdpo/noise.py), latents shifted and scaled, 1024 px.
- Wan2.1 (`WanPipeline`) and CogVideoX (`CogVideoXPipeline`): video transformers over latents of
  4k + 1 frame clips from a video VAE, one T5-family text encoder; Wan2.1 is a rectified flow with
  per-channel latent normalisation, CogVideoX a v-prediction DDPM that takes latents frames first
  with 3D rotary embeddings.
"""

from __future__ import annotations

import json
import os
import torch

from sdpo.conditioning import Conditioning
from sdpo.errors import InputError, first_line


def _like(value, tensor):
    """A number as it is; a tensor on `tensor`'s device, in its dtype."""
    return value.to(tensor.device, tensor.dtype) if isinstance(value, torch.Tensor) else value


class Family:
    """SD1.5: the base of the families. Subclasses change what differs."""

    name = "sd15"
    label = "SD1.x"
    article = "an"  # before the label
    pipeline_class = "StableDiffusionPipeline"
    denoiser_folder = "unet"
    denoiser_class_name = "UNet2DConditionModel"
    denoiser_name = "UNet"
    # (tokenizer folder, encoder folder, encoder class) per text encoder
    text_parts = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    resolution = 512
    memory_savers = False  # Adafactor and gradient checkpointing by default
    dspo_form = "sd15"  # sdpo.losses.DSPO_FORMS
    card_tag = "stable-diffusion"
    default_pipeline = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    default_vae = None
    sampling_steps, sampling_cfg = 50, 7.5  # the reference's protocol (cfg in its formula)
    sampling_scheduler_name = "EulerDiscreteScheduler"
    size_multiple = 8  # image sizes: the VAE's downsampling (SD3: times the transformer's patch size)
    sigma_density = False  # --weighting_scheme and its flags apply (rectified flow)
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    optional_t5 = False  # a T5 text encoder that --no_t5 leaves out
    # Whether the denoiser computes the same bits for an image in any batch (eval.generate batches
    # prompts only then; otherwise it samples one prompt at a time, so that no image depends on
    # --batch_size).
    batch_invariant = True
    video = False  # trains on video pairs (video_0, video_1) of --num_frames frames
    vae_class_name = "AutoencoderKL"

    # ---- loading ----------------------------------------------------------------------------

    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    def text_folders(self, no_t5: bool = False) -> list[tuple[str, str, str]]:
        return list(self.text_parts)

    def tokenizer_class(self, folder: str):
        from transformers import CLIPTokenizer

        return CLIPTokenizer

    def clean_caption(self, text: str) -> str:
        """A caption as the pipeline tokenizes it."""
        return text

    def token_lengths(self, tokenizers, sampling: bool = False) -> list[int]:
        """Tokens per caption for each tokenizer (padded or cut to it)."""
        return [t.model_max_length for t in tokenizers]

    def missing_context(self, denoiser_config, sampling: bool, num_encoders: int):
        """The shape (tokens, width) of the zeros that stand for a text encoder left out; None: none is."""
        return None

    def vae_dtype(self, weight_dtype: torch.dtype, separate_vae: bool) -> torch.dtype:
        """The VAE runs in the weight dtype."""
        return weight_dtype

    def noise_scheduler_class(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler

    def training_scheduler(self, config: dict):
        """The scheduler whose training grid the noise process uses, from the pipeline's scheduler
        config (as its from_pretrained builds it)."""
        return self.noise_scheduler_class().from_config(config)

    def noise_process(self, scheduler, args=None):
        from sdpo.noise import DDPM

        return DDPM(scheduler)

    def sampling_scheduler_class(self):
        import diffusers

        return getattr(diffusers, self.sampling_scheduler_name)

    def sampling_scheduler(self, config):
        """The scheduler that samples validation images, from the training scheduler's config."""
        return self.sampling_scheduler_class().from_config(config)

    # ---- conditioning -----------------------------------------------------------------------

    def encode(self, encoders, ids, device, dtype, size, missing=None) -> Conditioning:
        (encoder,) = encoders
        hidden = encoder(ids[0]).last_hidden_state
        return Conditioning(hidden if dtype is None else hidden.to(dtype))

    def model_inputs(self, noisy, timesteps, cond: Conditioning, config=None) -> dict:
        """The denoiser's keyword arguments (`config`: the denoiser's, for what its inputs depend on:
        CogVideoX's rotary embeddings)."""
        return {"sample": noisy, "timestep": timesteps, "encoder_hidden_states": cond.encoder_hidden_states}

    # ---- latents ----------------------------------------------------------------------------

    def vae_input(self, pixels):
        """A batch of pixels (N, 3, H, W) as the VAE takes it."""
        return pixels

    @staticmethod
    def latent_channels(vae_config) -> int:
        return vae_config.latent_channels

    @staticmethod
    def latent_norm(vae_config):
        """(scale, shift) of the latent normalisation: the VAE's scaling_factor and shift_factor (None
        where it has none)."""
        return vae_config.scaling_factor, getattr(vae_config, "shift_factor", None)

    def normalize(self, latents, scaling_factor, shift_factor):
        """VAE latents as the denoiser sees them: (latents - shift) * scale (no shift where the VAE
        has none); scale and shift are numbers or tensors that broadcast (per channel)."""
        if shift_factor is not None:
            latents = latents - _like(shift_factor, latents)
        return latents * _like(scaling_factor, latents)

    def denormalize(self, latents, scaling_factor, shift_factor):
        latents = latents / _like(scaling_factor, latents)
        return latents if shift_factor is None else latents + _like(shift_factor, latents)

    # ---- records ----------------------------------------------------------------------------

    def with_image_time_ids(self, cond: Conditioning, time_ids: torch.Tensor) -> Conditioning:
        """SDXL's --sdxl_true_time_ids: each image's own (B, k, 6) micro-conditioning, winners' rows
        first; the other families have none."""
        return cond

    def cache_identity(self, no_t5: bool = False) -> dict:
        """What the latent cache records about the family (SD1.5 and SDXL caches keep their old form)."""
        return {"sdxl": False}


class SDXL(Family):
    name = "sdxl"
    label = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_parts = (("tokenizer", "text_encoder", "CLIPTextModel"),
                  ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))
    resolution = 1024
    memory_savers = True  # the reference forces both on for SDXL; here they can be turned off
    dspo_form = "sdxl"
    card_tag = "stable-diffusion-xl"
    default_pipeline = "stabilityai/stable-diffusion-xl-base-1.0"
    default_vae = "madebyollin/sdxl-vae-fp16-fix"
    pipeline_extras = {}

    def vae_dtype(self, weight_dtype, separate_vae):
        """SDXL's own VAE overflows in fp16 (NaN latents): fp32 then; a separate VAE (the fp16-fix
        one) runs in fp16."""
        if weight_dtype == torch.float16 and not separate_vae:
            return torch.float32
        return weight_dtype

    def encode(self, encoders, ids, device, dtype, size, missing=None) -> Conditioning:
        """Both encoders' penultimate hidden states, concatenated; the second's pooled embedding;
        time ids (h, w, 0, 0, h, w), which the reference fixes for every image."""
        hidden_states, pooled = [], None
        for token_ids, encoder in zip(ids, encoders):
            out = encoder(token_ids, output_hidden_states=True)
            hidden_states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        h, w = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device).repeat(ids[0].shape[0], 1)
        hidden = torch.cat(hidden_states, dim=-1)
        dtype = dtype or hidden.dtype
        return Conditioning(hidden.to(dtype), pooled.to(dtype), time_ids.to(dtype))

    def model_inputs(self, noisy, timesteps, cond, config=None):
        return {**super().model_inputs(noisy, timesteps, cond),
                "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}

    def with_image_time_ids(self, cond, time_ids):
        cond.time_ids = time_ids.transpose(0, 1).reshape(-1, 6).to(cond.time_ids.device, cond.time_ids.dtype)
        return cond

    def cache_identity(self, no_t5=False):
        return {"sdxl": True}


class SD3(Family):
    name = "sd3"
    label = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_folder = "transformer"
    denoiser_class_name = "SD3Transformer2DModel"
    denoiser_name = "transformer"
    text_parts = (("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
                  ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
                  ("tokenizer_3", "text_encoder_3", "T5EncoderModel"))
    resolution = 1024
    memory_savers = False
    dspo_form = "sd15"  # the paper's form (r - beta s d)^2; the reference's SDXL switch is not carried over
    card_tag = "stable-diffusion-3"
    default_pipeline = "stabilityai/stable-diffusion-3.5-medium"
    # The pipeline's defaults: 28 steps, guidance_scale 7.0 (cond + 6.0 (cond - uncond) here).
    sampling_steps, sampling_cfg = 28, 6.0
    sampling_scheduler_name = "FlowMatchEulerDiscreteScheduler"
    size_multiple = 16  # the VAE's 8 x the transformer's patch size 2 (an odd latent would be cropped)
    sigma_density = True
    pipeline_extras = {}
    optional_t5 = True
    batch_invariant = False  # on a CPU its linear layers round differently at other batch sizes (1e-7)
    T5_LENGTH = 77  # T5 tokens in training: diffusers' SD3 training examples' --max_sequence_length
    T5_SAMPLING_LENGTH = 256  # and in sampling: StableDiffusion3Pipeline's max_sequence_length

    def text_folders(self, no_t5=False):
        return list(self.text_parts[:2] if no_t5 else self.text_parts)

    def tokenizer_class(self, folder):
        if folder == "tokenizer_3":
            from transformers import AutoTokenizer

            return AutoTokenizer
        return super().tokenizer_class(folder)

    def token_lengths(self, tokenizers, sampling=False):
        t5 = self.T5_SAMPLING_LENGTH if sampling else self.T5_LENGTH
        return [t.model_max_length for t in tokenizers[:2]] + [t5] * len(tokenizers[2:])

    def missing_context(self, denoiser_config, sampling, num_encoders):
        if num_encoders != 2:  # T5 is there (or no encoder is: tokenizing only)
            return None
        return (self.T5_SAMPLING_LENGTH if sampling else self.T5_LENGTH), denoiser_config.joint_attention_dim

    def noise_scheduler_class(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def vae_dtype(self, weight_dtype, separate_vae):
        """SD3's VAE asks for fp32 under fp16 (force_upcast in its config), as SDXL's own."""
        return torch.float32 if weight_dtype == torch.float16 else weight_dtype

    def noise_process(self, scheduler, args=None):
        return rectified_flow(scheduler, args)

    def encode(self, encoders, ids, device, dtype, size, missing=None):
        """As StableDiffusion3Pipeline.encode_prompt (no clip skip): the CLIPs' penultimate states
        concatenated and zero-padded to T5's width, T5's last states appended on the sequence axis
        (without T5, zeros of (B, T5 tokens, joint_attention_dim)); the CLIPs' pooled embeddings concatenated."""
        clip_states, pooled = [], []
        for token_ids, encoder in zip(ids[:2], encoders[:2]):
            out = encoder(token_ids, output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(clip_states, dim=-1)
        if len(encoders) == 3:
            t5 = encoders[2](ids[2])[0]
        else:
            t5 = torch.zeros(clip.shape[0], *missing, device=clip.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden, pooled = torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)
        dtype = dtype or hidden.dtype
        return Conditioning(hidden.to(dtype), pooled.to(dtype))

    def model_inputs(self, noisy, timesteps, cond, config=None):
        if timesteps.ndim == 0:  # one timestep for the batch, as the pipeline expands it
            timesteps = timesteps.expand(noisy.shape[0])
        return {"hidden_states": noisy, "timestep": timesteps, "encoder_hidden_states": cond.encoder_hidden_states,
                "pooled_projections": cond.pooled}

    def cache_identity(self, no_t5=False):
        return {"sdxl": False, "family": self.name, "no_t5": bool(no_t5)}


class VideoFamily(Family):
    """What the video families share: a transformer in transformer/, one T5-family text encoder read
    at the pipeline's text length, a video VAE that takes (N, 3, F, H, W) pixels and compresses time
    (so a clip has k * compression + 1 frames: the first frame is encoded alone), no pipeline extras.
    Video pairs are read from video_0 and video_1 (sdpo/video.py)."""

    article = "a"
    video = True
    denoiser_folder = "transformer"
    denoiser_name = "transformer"
    memory_savers = True  # a clip's activations are those of dozens of images
    size_multiple = 16  # the VAE's 8 x the transformer's patch size 2
    TEXT_LENGTH = 226
    pipeline_extras = {}
    batch_invariant = False

    def tokenizer_class(self, folder):
        from transformers import AutoTokenizer

        return AutoTokenizer

    def token_lengths(self, tokenizers, sampling=False):
        return [self.TEXT_LENGTH] * len(tokenizers)

    def vae_input(self, pixels):
        """Clips (N, F, 3, H, W) as the video VAE takes them, (N, 3, F, H, W)."""
        return pixels.transpose(1, 2)

    @staticmethod
    def temporal_compression(vae_config) -> int:
        raise NotImplementedError

    def check_num_frames(self, num_frames: int, vae_config, denoiser_config) -> None:
        """A ValueError unless the VAE can encode clips of `num_frames` frames without dropping any."""
        r = self.temporal_compression(vae_config)
        if num_frames < 1 or (num_frames - 1) % r:
            below = (num_frames - 1) // r * r + 1
            raise ValueError(f"the {self.label} VAE compresses time {r}x after the first frame: clips need "
                             f"{r}k + 1 frames (e.g. {max(below, 1)} or {below + r}), got {num_frames}")

    def model_inputs(self, noisy, timesteps, cond, config=None):
        if timesteps.ndim == 0:  # one timestep for the batch, as the pipeline expands it
            timesteps = timesteps.expand(noisy.shape[0])
        return {"hidden_states": noisy, "timestep": timesteps, "encoder_hidden_states": cond.encoder_hidden_states}

    def cache_identity(self, no_t5=False):
        return {"sdxl": False, "family": self.name}


class Wan21(VideoFamily):
    """Wan2.1 text-to-video (`WanPipeline`): a video transformer in transformer/, one UMT5 encoder
    whose states past each caption's tokens are zeros (as the pipeline's encode_prompt), latents
    normalised per channel with the VAE's latents_mean and latents_std, rectified flow."""

    name = "wan21"
    label = "Wan2.1"
    pipeline_class = "WanPipeline"
    denoiser_class_name = "WanTransformer3DModel"
    vae_class_name = "AutoencoderKLWan"
    text_parts = (("tokenizer", "text_encoder", "UMT5EncoderModel"),)
    card_tag = "wan2.1"
    default_pipeline = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    resolution, size, num_frames = 480, (480, 832), 81  # the pipeline's defaults
    fps = 16  # as Wan2.1's examples export its videos
    sampling_steps, sampling_cfg = 50, 4.0  # the pipeline's guidance_scale 5
    sampling_scheduler_name = "UniPCMultistepScheduler"
    sigma_density = True
    TEXT_LENGTH = 512  # WanPipeline's max_sequence_length

    def clean_caption(self, text: str) -> str:
        """The pipeline's prompt_clean: ftfy, HTML entities, whitespace."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return prompt_clean(text)

    def encode(self, encoders, ids, device, dtype, size, missing=None):
        (encoder,) = encoders
        mask = (ids[0] != 0).long()  # T5's pad id is 0, and padding is all that is 0
        # (On the meta device, where bench.py counts FLOPs, transformers cannot look into the mask;
        # the count is the same without it.)
        hidden = encoder(ids[0], None if ids[0].is_meta else mask).last_hidden_state * mask.unsqueeze(-1)
        return Conditioning(hidden if dtype is None else hidden.to(dtype))

    @staticmethod
    def temporal_compression(vae_config):
        return 2 ** sum(vae_config.temperal_downsample)  # (diffusers' spelling)

    @staticmethod
    def latent_channels(vae_config):
        return vae_config.z_dim

    @staticmethod
    def latent_norm(vae_config):
        """(scale, shift) per channel, shaped to broadcast over (B, C, F, H, W) latents."""
        mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1, 1)
        return 1.0 / torch.tensor(vae_config.latents_std).view(1, -1, 1, 1, 1), mean

    def noise_scheduler_class(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def training_scheduler(self, config):
        """The released pipelines ship a UniPC sampler with flow sigmas: training uses the grid of a
        FlowMatchEulerDiscreteScheduler with the same shift (its flow_shift: 3.0 for Wan2.1-T2V-1.3B),
        so that training and sampling see the same noise levels. A flow-matching Euler config is
        taken as it is."""
        cls = self.noise_scheduler_class()
        if config.get("_class_name") == cls.__name__:
            return cls.from_config(config)
        return cls(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config.get("flow_shift", 1.0))

    def noise_process(self, scheduler, args=None):
        return rectified_flow(scheduler, args)


class CogVideoX(VideoFamily):
    """CogVideoX text-to-video (`CogVideoXPipeline`): a video transformer that takes latents frames
    first, (B, F, C, H, W), with 3D rotary embeddings computed from the latent size, one T5 encoder
    (226 tokens), latents scaled by the VAE's scaling_factor, v-prediction DDPM on the betas of its
    CogVideoXDDIMScheduler (SNR shift, zero terminal SNR)."""

    name = "cogvideox"
    label = "CogVideoX"
    pipeline_class = "CogVideoXPipeline"
    denoiser_class_name = "CogVideoXTransformer3DModel"
    vae_class_name = "AutoencoderKLCogVideoX"
    text_parts = (("tokenizer", "text_encoder", "T5EncoderModel"),)
    card_tag = "cogvideox"
    default_pipeline = "THUDM/CogVideoX-2b"
    resolution, size, num_frames = 480, (480, 720), 49  # the pipeline's defaults
    fps = 8  # as CogVideoX's examples export its videos
    sampling_steps, sampling_cfg = 50, 5.0  # the pipeline's guidance_scale 6
    sampling_scheduler_name = "CogVideoXDDIMScheduler"
    TEXT_LENGTH = 226  # CogVideoXPipeline's max_sequence_length

    def encode(self, encoders, ids, device, dtype, size, missing=None):
        (encoder,) = encoders
        hidden = encoder(ids[0])[0]
        return Conditioning(hidden if dtype is None else hidden.to(dtype))

    @staticmethod
    def temporal_compression(vae_config):
        return vae_config.temporal_compression_ratio

    def check_num_frames(self, num_frames, vae_config, denoiser_config):
        super().check_num_frames(num_frames, vae_config, denoiser_config)
        p_t = getattr(denoiser_config, "patch_size_t", None)
        latent_frames = (num_frames - 1) // self.temporal_compression(vae_config) + 1
        if p_t and latent_frames % p_t:  # CogVideoX 1.5 patches time too; its pipeline pads, training would not
            raise ValueError(f"the transformer patches {p_t} latent frames together: {num_frames} frames make "
                             f"{latent_frames} latent frames, not a multiple of {p_t}")

    def noise_scheduler_class(self):
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler

    def normalize(self, latents, scaling_factor, shift_factor):
        return self.to_frames_first(super().normalize(latents, scaling_factor, shift_factor))

    def denormalize(self, latents, scaling_factor, shift_factor):
        return super().denormalize(latents.permute(0, 2, 1, 3, 4), scaling_factor, shift_factor)

    @staticmethod
    def to_frames_first(latents):
        """VAE latents (B, C, F, H, W) as the transformer takes them, (B, F, C, H, W)."""
        return latents.permute(0, 2, 1, 3, 4)

    def model_inputs(self, noisy, timesteps, cond, config=None):
        inputs = super().model_inputs(noisy, timesteps, cond)
        if config is None:
            raise TypeError("CogVideoX's inputs need the transformer's config (its rotary embeddings)")
        if config.use_rotary_positional_embeddings:
            frames, _, height, width = noisy.shape[1:]
            inputs["image_rotary_emb"] = self.rotary_embeddings(config, frames, height, width, noisy.device)
        return inputs

    @staticmethod
    def rotary_embeddings(config, frames: int, height: int, width: int, device):
        """(cos, sin) for latents of (frames, height, width), as CogVideoXPipeline's
        _prepare_rotary_positional_embeddings computes them from the pixel size."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        p, p_t = config.patch_size, config.patch_size_t
        grid = (height // p, width // p)
        base_width, base_height = config.sample_width // p, config.sample_height // p
        if p_t is None:  # CogVideoX 1.0
            return get_3d_rotary_pos_embed(
                embed_dim=config.attention_head_dim, grid_size=grid, temporal_size=frames, device=device,
                crops_coords=get_resize_crop_region_for_grid(grid, base_width, base_height))
        return get_3d_rotary_pos_embed(  # CogVideoX 1.5
            embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
            temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_height, base_width),
            device=device)


def rectified_flow(scheduler, args=None):
    """The rectified-flow process on a flow-matching scheduler's grid, its sigmas drawn as the run's
    --weighting_scheme says (sdpo.noise.RectifiedFlow)."""
    from sdpo.noise import RectifiedFlow

    check_static_shift(scheduler.config)
    if args is None:
        return RectifiedFlow(scheduler)
    density = "uniform" if args.weighting_scheme == "none" else args.weighting_scheme
    return RectifiedFlow(scheduler, density, args.logit_mean, args.logit_std, args.mode_scale)


def check_static_shift(config) -> None:
    """A flow-matching scheduler must shift its sigmas by a fixed amount (SD3's `shift`): with
    `use_dynamic_shifting` the shift depends on the image size, which neither the training grid
    nor our sampling passes on."""
    if config.get("use_dynamic_shifting", False):
        raise ValueError("use_dynamic_shifting is set; this project trains and samples with a fixed shift "
                         "(set use_dynamic_shifting false and shift in scheduler/scheduler_config.json)")


FAMILIES = {f.name: f for f in (Family(), SDXL(), SD3(), Wan21(), CogVideoX())}
SUPPORTED = ("SD1.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline), SD3/SD3.5 (StableDiffusion3Pipeline), "
             "Wan2.1 (WanPipeline) and CogVideoX (CogVideoXPipeline)")


def get(name: str) -> Family:
    return FAMILIES[name]


def denoiser_folder_of(model) -> str:
    """The pipeline folder of a denoiser (unet, transformer), by its class."""
    name = type(model).__name__
    return next(f.denoiser_folder for f in FAMILIES.values() if f.denoiser_class_name == name)


def read_index(source: str, **hub) -> dict | None:
    """A pipeline's model_index.json: from a local folder, or from the hub (None when it cannot be
    read there: the loaders report that)."""
    index = os.path.join(source, "model_index.json")
    if os.path.isdir(source):
        if not os.path.isfile(index):
            return None
        try:
            with open(index) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{index}: unreadable ({first_line(err)})") from None
    if os.path.exists(source):
        return None
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(source, **{k: v for k, v in hub.items() if v is not None}))
    except Exception:  # not on the hub, offline, no such revision: the loaders say which, later
        return None


def family_of_index(index: dict, source: str, flag: str) -> Family:
    """The family of a pipeline by its parts: a transformer of a family (SD3, Wan2.1, CogVideoX), or
    a UNet with one or two CLIP encoders; anything else is refused, naming the families that are
    supported."""
    part = lambda name: (index.get(name) or [None, None])[1]  # noqa: E731
    for family in FAMILIES.values():
        if family.denoiser_folder == "transformer" and part("transformer") == family.denoiser_class_name:
            return family
    if part("unet") == Family.denoiser_class_name:
        return FAMILIES["sdxl" if part("text_encoder_2") else "sd15"]
    denoiser = part("transformer") or part("unet") or "no denoiser"
    raise InputError(f"{flag} {source} is a {index.get('_class_name', 'pipeline')} ({denoiser}): this project "
                     f"trains {SUPPORTED}")


def detect(source: str, flag: str = "--pretrained_model_name_or_path", **hub) -> Family | None:
    """The family of a pipeline source, from its model_index.json; None where that cannot be read."""
    index = read_index(source, **hub)
    return None if index is None else family_of_index(index, source, flag)


def resolve(source: str, sdxl: bool, flag: str = "--pretrained_model_name_or_path", strict: bool = True,
            **hub) -> Family:
    """The family of the base pipeline: read from its model_index.json, else SDXL with --sdxl and
    SD1.5 without. strict: an index that names another family than --sdxl says is an error (one
    line saying which flag to change); otherwise (while flags are parsed) the index wins."""
    index = read_index(source, **hub)
    if index is None:
        return FAMILIES["sdxl" if sdxl else "sd15"]
    try:
        found = family_of_index(index, source, flag)
    except InputError:
        if strict:
            raise
        return FAMILIES["sdxl" if sdxl else "sd15"]
    if strict and (found.name == "sdxl") != bool(sdxl):
        raise InputError(f"{flag} {source} is {found.article} {found.label} pipeline: "
                         f"{'add' if found.name == 'sdxl' else 'remove'} --sdxl")
    return found
