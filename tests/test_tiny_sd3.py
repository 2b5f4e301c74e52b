"""The offline tiny SD3 pipeline (sdpo/tiny.py): real diffusers and transformers classes with tiny
random weights and tokenizers built offline; it loads with StableDiffusion3Pipeline and generates,
with and without its T5, and its sigmas are the rectified flow of sdpo/noise.py."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from sdpo.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny-sd3") / "sd3"))


def test_the_t5_tokenizer_is_built_offline(sd3):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sd3, subfolder="tokenizer_3")
    ids = tokenizer("A red cat", padding="max_length", max_length=12).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[:8]) == ["\u2581A", "\u2581r", "e", "d", "\u2581c", "a", "t", "</s>"]
    assert ids[8:] == [tokenizer.pad_token_id] * 4 == [0] * 4
    assert tokenizer.unk_token_id not in ids


def test_the_pipeline_loads_and_generates_with_and_without_t5(sd3):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3)
    assert pipe.vae.config.shift_factor == 0.1 and pipe.vae.config.scaling_factor == 1.5

    def image(p, seed=0):
        return p("a red cat", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(seed)).images[0]

    a = image(pipe)
    assert a.shape == (32, 32, 3) and np.isfinite(a).all()
    assert np.array_equal(a, image(pipe)) and not np.array_equal(a, image(pipe, seed=1))
    no_t5 = StableDiffusion3Pipeline.from_pretrained(sd3, text_encoder_3=None, tokenizer_3=None)
    b = image(no_t5)
    assert b.shape == (32, 32, 3) and not np.array_equal(a, b)  # T5's embeddings mattered


def test_its_training_grid_is_the_rectified_flow_of_sdpo_noise(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdpo.noise import RectifiedFlow

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3, subfolder="scheduler")
    process = RectifiedFlow(scheduler)
    index = torch.arange(process.grid_size())
    sigma = process.sigma(index)
    assert process.grid_size() == 1000 and (sigma[:-1] > sigma[1:]).all()  # descending from about 1
    unshifted = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
    torch.testing.assert_close(sigma, 3 * unshifted / (1 + 2 * unshifted), rtol=1e-6, atol=1e-7)  # shift 3
