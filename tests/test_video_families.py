"""The video model families (sdpo/families.py, not yet registered for training): their caption
conditioning equals WanPipeline's and CogVideoXPipeline's encode_prompt, and their latent
normalisation is the inverse of what each pipeline does before decoding."""

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
    normalised = Wan21.normalize(z, scale, shift)
    # WanPipeline before decoding: latents / (1 / std) + mean.
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(normalised / (1.0 / std) + mean, z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Wan21.denormalize(normalised, scale, shift), z, rtol=1e-6, atol=1e-6)


def test_cogvideox_latents_go_frames_first_and_are_scaled():
    from sdpo.families import CogVideoX

    z = torch.randn(2, 4, 3, 5, 6)
    frames_first = CogVideoX.to_frames_first(CogVideoX.normalize(z, 0.7, None))
    assert frames_first.shape == (2, 3, 4, 5, 6)
    # CogVideoXPipeline.decode_latents: permute back to channels first, then 1 / scaling_factor.
    torch.testing.assert_close(1 / 0.7 * frames_first.permute(0, 2, 1, 3, 4), z)
