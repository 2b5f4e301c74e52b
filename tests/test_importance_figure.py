"""scripts/importance_weights.py: the mean importance weight against the timestep for data pairs and
the model's own samples, computed as training computes it; checked against the DDPM closed form
(sdpo.timesteps.log_importance_weights) on the tiny SD1.5 UNet's own predictions, and run on a
video family."""

import json
import os
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import importance_weights  # noqa: E402


def test_the_figure_and_its_numbers(tiny, tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdpo.timesteps import log_importance_weights

    out = tmp_path / "weights.png"
    result = importance_weights.main(["--pretrained_model_name_or_path", tiny["sd15"], "--dataset_name", tiny["data"],
                                      "--resolution", "32", "--num_pairs", "3", "--levels", "4",
                                      "--sampling_steps", "2", "--device", "cpu", "--out", str(out)])
    assert out.is_file() and json.load(open(tmp_path / "weights.json")) == result
    assert result["levels"] == [125, 375, 625, 875] and result["timesteps"] == [125.0, 375.0, 625.0, 875.0]
    assert all(w > 0 for w in result["off_policy"] + result["on_policy"])
    assert result["off_policy"] != result["on_policy"]
    # The off-policy value at level 375 by hand: the pipeline's parts, the DDPM closed form.
    settings = importance_weights.train_settings(importance_weights.parse_args(
        ["--pretrained_model_name_or_path", tiny["sd15"], "--dataset_name", tiny["data"], "--resolution", "32",
         "--num_pairs", "3", "--device", "cpu", "--out", str(tmp_path / "x.png")]))
    batch = importance_weights.data_pairs(settings, 3)
    vae = AutoencoderKL.from_pretrained(tiny["sd15"], subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny["sd15"], subfolder="unet")
    tokenizer = CLIPTokenizer.from_pretrained(tiny["sd15"], subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny["sd15"], subfolder="text_encoder")
    scheduler = DDPMScheduler.from_pretrained(tiny["sd15"], subfolder="scheduler")
    with torch.no_grad():
        pixels = batch.pixels.transpose(0, 1).reshape(-1, 3, 32, 32)  # winners, then losers
        x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        g = torch.Generator().manual_seed(1)  # the second level's draws
        noise, z = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
        t = torch.full((6,), 375)
        ids = tokenizer(batch.captions, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        hidden = encoder(ids).last_hidden_state.repeat(2, 1, 1)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        log_w = log_importance_weights(pred, noise, t, scheduler.alphas_cumprod, "epsilon", z)
    assert result["off_policy"][1] == pytest.approx(float(log_w.exp().mean()), rel=1e-5)


def test_the_figure_on_a_video_model(tiny_video, tmp_path):
    result = importance_weights.main(["--pretrained_model_name_or_path", tiny_video["cogvideox"], "--dataset_name",
                                      tiny_video["video_data"], "--num_frames", "9", "--height", "32", "--width", "32",
                                      "--num_pairs", "2", "--levels", "3", "--sampling_steps", "2", "--device", "cpu",
                                      "--out", str(tmp_path / "w.png")])
    assert result["family"] == "cogvideox" and len(result["on_policy"]) == 3 and (tmp_path / "w.png").is_file()
