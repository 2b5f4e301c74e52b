"""Each score equals its definition computed by hand from the model's embeddings (tiny random models)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from eval.scorers import build_scorer, load_state_dict
from eval.tiny import build_tiny_scorers


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_tiny_scorers(str(tmp_path_factory.mktemp("scorers")))


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")) for _ in range(n)]


PROMPTS = ["a cat", "a red house on a hill", "two boats"]


def cosine(a, b):
    a, b = a.double(), b.double()
    return [float((a[i] * b[i]).sum() / (a[i].pow(2).sum().sqrt() * b[i].pow(2).sum().sqrt())) for i in range(len(a))]


def test_pickscore_is_the_embedding_cosine(sources):
    scorer = build_scorer("pickscore", batch_size=2, **sources["pickscore"])
    got = scorer.score(images(), PROMPTS)
    with torch.no_grad():
        pixels = scorer.processor(images=images(), return_tensors="pt")["pixel_values"]
        tokens = scorer.processor(text=PROMPTS, padding=True, return_tensors="pt")
        out = scorer.model(pixel_values=pixels, **tokens)  # the model's own forward: image_embeds, text_embeds
    assert got == pytest.approx(cosine(out.image_embeds, out.text_embeds), abs=1e-6)
    assert len(set(round(g, 6) for g in got)) == 3


@pytest.mark.parametrize("metric", ["clip", "hpsv2"])
def test_open_clip_scores_are_the_cosine_of_the_loaded_weights(sources, metric):
    import open_clip

    scorer = build_scorer(metric, batch_size=2, **sources[metric])
    got = scorer.score(images(), PROMPTS)
    # A second model built from the checkpoint file by hand; its forward returns normalised features.
    src = sources[metric]
    model = open_clip.create_model(src["arch"], pretrained=None)
    model.load_state_dict(load_state_dict(src.get("checkpoint") or src["pretrained"]))
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([scorer.preprocess(im) for im in images()])
        image_features, text_features, _ = model(pixels, open_clip.get_tokenizer(src["arch"])(PROMPTS))[:3]
    expected = (image_features * text_features).sum(-1).tolist()
    assert got == pytest.approx(expected, abs=1e-5)
    # The checkpoint was really loaded: a freshly initialised model scores differently.
    fresh = open_clip.create_model(src["arch"], pretrained=None).eval()
    with torch.no_grad():
        f_img, f_txt, _ = fresh(pixels, open_clip.get_tokenizer(src["arch"])(PROMPTS))[:3]
    assert (f_img * f_txt).sum(-1).tolist() != pytest.approx(expected, abs=1e-3)


def test_aesthetics_is_the_mlp_on_the_normalised_embedding(sources):
    scorer = build_scorer("aesthetics", batch_size=2, **sources["aesthetics"])
    got = scorer.score(images(), PROMPTS)
    with torch.no_grad():
        pixels = scorer.processor(images=images(), return_tensors="pt")["pixel_values"]
        embeds = scorer.clip(pixel_values=pixels, input_ids=torch.zeros(3, 2, dtype=torch.long)).image_embeds.double()
    x = embeds / embeds.pow(2).sum(-1, keepdim=True).sqrt()
    state = torch.load(sources["aesthetics"]["mlp"], weights_only=True)
    for layer in (0, 2, 4, 6, 7):  # linear layers only: the head has no activations
        x = x @ state[f"layers.{layer}.weight"].double().T + state[f"layers.{layer}.bias"].double()
    assert got == pytest.approx(x.squeeze(-1).tolist(), abs=1e-6)


def test_imagereward_and_unknown_metrics_say_so(sources):
    from sdpo.errors import InputError

    with pytest.raises(InputError, match="not implemented yet"):
        build_scorer("imagereward")
    with pytest.raises(InputError, match="unknown metric"):
        build_scorer("fid")
