"""The video model families (sdpo/families.py): their caption conditioning equals WanPipeline's and
CogVideoXPipeline's encode_prompt, their latent normalisation is the inverse of what each pipeline
does before decoding, CogVideoX's rotary embeddings are the pipeline's, and each is found from its
model_index.json."""

import pytest
import torch

from test_tiny_video import video  # noqa: F401  (the module's tiny pipelines)


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
def test_the_conditioning_is_the_pipelines(video, name):  # noqa: F811
    import diffusers

    from sdpo import families, models
    from sdpo.conditioning import PromptEncoder

    family = {"wan21": families.Wan21(), "cogvideox": families.CogVideoX()}[name]
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(video[name])
    tokenizers, encoders = models.load_text_side(video[name], family)
    captions = ["a  red cat &amp; a dog ", ""]
    ours = PromptEncoder(family, tokenizers, encoders, 32, pipe.transformer.config, sampling=True)(captions, "cpu")
    with torch.no_grad():
        theirs = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                    max_sequence_length=family.TEXT_LENGTH)[0]  # (the length their __call__ uses)
    assert ours.encoder_hidden_states.shape == theirs.shape == (2, family.TEXT_LENGTH, 32)
    assert torch.equal(ours.encoder_hidden_states, theirs)


def test_wan_latents_are_normalised_per_channel_as_the_pipeline_undoes_it(video):  # noqa: F811
    from diffusers import AutoencoderKLWan

    from sdpo.families import Wan21

    vae = AutoencoderKLWan.from_pretrained(video["wan21"], subfolder="vae")
    scale, shift = Wan21.latent_norm(vae.config)
    z = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    normalised = Wan21().normalize(z, scale, shift)
    # WanPipeline before decoding: latents / (1 / std) + mean.
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(normalised / (1.0 / std) + mean, z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Wan21().denormalize(normalised, scale, shift), z, rtol=1e-6, atol=1e-6)


def test_cogvideox_latents_go_frames_first_and_are_scaled():
    from sdpo.families import CogVideoX

    z = torch.randn(2, 4, 3, 5, 6)
    frames_first = CogVideoX().normalize(z, 0.7, None)
    assert frames_first.shape == (2, 3, 4, 5, 6)
    torch.testing.assert_close(CogVideoX().denormalize(frames_first, 0.7, None), z)
    # CogVideoXPipeline.decode_latents: permute back to channels first, then 1 / scaling_factor.
    torch.testing.assert_close(1 / 0.7 * frames_first.permute(0, 2, 1, 3, 4), z)


def test_cogvideox_rotary_embeddings_are_the_pipelines(video):  # noqa: F811
    """From the latent size, as CogVideoXPipeline computes them from the pixel size."""
    from diffusers import CogVideoXPipeline

    from sdpo.families import CogVideoX

    pipe = CogVideoXPipeline.from_pretrained(video["cogvideox"])
    theirs = pipe._prepare_rotary_positional_embeddings(32, 48, 3, "cpu")
    ours = CogVideoX.rotary_embeddings(pipe.transformer.config, 3, 4, 6, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    noisy = torch.zeros(2, 3, 4, 4, 6)
    inputs = CogVideoX().model_inputs(noisy, torch.tensor(5), type("C", (), {"encoder_hidden_states": None})(),
                                      pipe.transformer.config)
    assert inputs["timestep"].tolist() == [5, 5] and torch.equal(inputs["image_rotary_emb"][0], theirs[0])


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
def test_each_video_family_is_found_from_its_pipeline(video, name):  # noqa: F811
    from sdpo import families

    family = families.detect(video[name])
    assert family.name == name and family.video and families.get(name) is family
    assert families.denoiser_folder_of(getattr(__import__("diffusers"), family.denoiser_class_name)
                                       .from_pretrained(video[name], subfolder="transformer")) == "transformer"


@pytest.mark.parametrize("name,ok,bad", [("wan21", [1, 5, 81], [4, 6, 80]), ("cogvideox", [1, 9, 49], [8, 48])])
def test_clips_need_4k_plus_1_frames(video, name, ok, bad):  # noqa: F811
    from sdpo import families, models

    family = families.get(name)
    vae_config = models.vae_config(video[name], family=family)
    denoiser = models.base_unet_shapes(video[name], family=family).config
    for n in ok:
        family.check_num_frames(n, vae_config, denoiser)
    for n in bad:
        with pytest.raises(ValueError, match="4k \\+ 1 frames"):
            family.check_num_frames(n, vae_config, denoiser)


def test_a_frozen_wan_transformer_keeps_its_fp32_modules_as_from_pretrained(video):  # noqa: F811
    """models.cast_frozen leaves the parameters and buffers in fp32 that diffusers' from_pretrained
    (torch_dtype=bf16) leaves in fp32 (norms, time embedder, rotary embedding, modulation tables),
    and casts the rest, to the same values."""
    from diffusers import WanTransformer3DModel

    from sdpo.models import cast_frozen

    loaded = WanTransformer3DModel.from_pretrained(video["wan21"], subfolder="transformer", torch_dtype=torch.bfloat16)
    cast = cast_frozen(WanTransformer3DModel.from_pretrained(video["wan21"], subfolder="transformer"), torch.bfloat16)
    theirs = dict([*loaded.named_parameters(), *loaded.named_buffers()])
    ours = dict([*cast.named_parameters(), *cast.named_buffers()])
    assert theirs.keys() == ours.keys() and any(t.dtype == torch.float32 for t in ours.values())
    assert ours["scale_shift_table"].dtype == ours["blocks.0.scale_shift_table"].dtype == torch.float32
    assert ours["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
