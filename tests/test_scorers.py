"""Each score equals its definition computed by hand from the model's embeddings (tiny random models),
and the aesthetic head, loaded from the released LAION weights where they are present, is the stack of
linear maps it is said to be."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from eval.scorers import build_scorer, load_aesthetic_mlp, load_state_dict
from eval.tiny import IMAGE_SIZE, build_tiny_scorers

# The released LAION aesthetic-predictor weights, as the reference ships them. Only in the project's
# shared data folder beside the checkout: a clone lacks them, and the test that needs them skips.
REAL_AESTHETIC_MLP = os.path.join(ROOT, "..", "shared", "data", "upstream", "diffusion-sdpo", "utils",
                                  "aesthetics_model", "sac+logos+ava1-l14-linearMSE.pth")


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


def test_real_aesthetic_weights_are_five_linear_maps():
    if not os.path.isfile(REAL_AESTHETIC_MLP):
        pytest.skip("the released aesthetic-predictor weights are not available: they are in the project's "
                    "shared data folder beside the checkout, which a plain clone does not have")
    state = load_state_dict(REAL_AESTHETIC_MLP)  # weights_only=True, as the scorer loads it
    widths = (768, 1024, 128, 64, 16, 1)
    linear = (0, 2, 4, 6, 7)  # indices 1, 3, 5 are dropouts, which hold no parameters
    expected = {}
    for index, n_in, n_out in zip(linear, widths, widths[1:]):
        expected[f"layers.{index}.weight"] = (n_out, n_in)
        expected[f"layers.{index}.bias"] = (n_out,)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == list(expected.items())

    mlp = load_aesthetic_mlp(REAL_AESTHETIC_MLP)  # the scorer's own loader
    assert not mlp.training  # dropout off
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 768)))
    x = x / x.pow(2).sum(-1, keepdim=True).sqrt()  # L2-normalised, as the CLIP image embedding is
    h = x
    for index in linear:
        h = h @ state[f"layers.{index}.weight"].double().T + state[f"layers.{index}.bias"].double()
    by_hand = h.squeeze(-1)
    with torch.no_grad():
        got32 = mlp(x.float()).squeeze(-1).double()
        got64 = mlp.double()(x).squeeze(-1)
    assert torch.allclose(got64, by_hand, rtol=0, atol=1e-12)
    assert torch.allclose(got32, by_hand, rtol=0, atol=1e-4)
    # The values themselves (on LAION's 1-10 scale), so that other weights in that file would be noticed.
    assert by_hand.tolist() == pytest.approx([4.464581, 5.480435, 5.008131, 5.676257, 5.575931], abs=1e-6)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        assert not torch.allclose(mlp.train()(x).squeeze(-1), by_hand, atol=1e-3)  # so eval mode mattered


def test_unknown_metrics_say_so():
    from sdpo.errors import InputError

    with pytest.raises(InputError, match="unknown metric"):
        build_scorer("fid")


# ---- our paths against the packages' own model code, on the same random weights -------------------

def test_imagereward_matches_the_package_model_code(tmp_path, monkeypatch):
    import json

    from eval.imagereward import blip_tokenizer
    from eval.tiny import write_bert_vocab
    from package_shims import imagereward_modules

    package, blip_pretrain = imagereward_modules()
    tok_dir = str(tmp_path / "tok")
    vocab = write_bert_vocab(tok_dir)
    med = {"architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "vocab_size": vocab + 2, "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "add_cross_attention": True, "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "pad_token_id": 0, "type_vocab_size": 2, "initializer_range": 0.02}
    med_path = str(tmp_path / "med_config.json")
    json.dump(med, open(med_path, "w"))
    monkeypatch.setattr(blip_pretrain, "init_tokenizer", lambda: blip_tokenizer(tok_dir))
    torch.manual_seed(0)
    # The package's ImageReward, built small (ViT-B at 32 px, a 2-layer BERT); its own score() runs below.
    model = package.ImageReward.__new__(package.ImageReward)
    torch.nn.Module.__init__(model)
    model.device = "cpu"
    model.blip = blip_pretrain.BLIP_Pretrain(med_config=med_path, image_size=32, vit="base")
    model.preprocess = package._transform(32)
    model.mlp = package.MLP(32)
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    with torch.no_grad():
        for p in model.parameters():  # make every weight (biases, norms too) non-trivial
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    checkpoint = str(tmp_path / "ImageReward.pt")
    torch.save(model.state_dict(), checkpoint)
    expected = [model.score(p, im) for p, im in zip(PROMPTS, images())]

    scorer = build_scorer("imagereward", batch_size=2, checkpoint=checkpoint, med_config=med_path,
                          tokenizer=tok_dir, vision_heads="12")
    got = scorer.score(images(), PROMPTS)
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(expected) - min(expected) > 1e-3  # the prompts and images do move the score


def open_clip_eval_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """open_clip's evaluation preprocessing, written out with PIL and numpy: the shorter side resized
    to `size` (bicubic, on the PIL image; the longer side scaled and truncated to an integer), a
    centred size x size crop, RGB in [0, 1], then OpenAI CLIP's mean and standard deviation."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    resized = image.convert("RGB").resize(new_size, Image.BICUBIC)
    left, top = round((new_size[0] - size) / 2), round((new_size[1] - size) / 2)
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return torch.from_numpy(((crop - mean) / std).transpose(2, 0, 1).copy())


def test_hpsv2_matches_the_package_model_code(sources):
    """The hpsv2 package scores with its vendored open_clip: same weights, same scores as ours."""
    from package_shims import hpsv2_open_clip

    hoc = hpsv2_open_clip()
    src = sources["hpsv2"]
    hoc.add_model_config(src["config"])
    model, _, preprocess = hoc.create_model_and_transforms(src["arch"], pretrained=None, precision="fp32",
                                                           device="cpu", output_dict=True)
    model.load_state_dict(load_state_dict(src["checkpoint"]))
    model.eval()
    tokenizer = hoc.get_tokenizer(src["arch"])
    with torch.no_grad():  # the package's scoring: normalised features, image @ text, the diagonal
        pixels = torch.stack([preprocess(im) for im in images()])
        out = model(pixels, tokenizer(PROMPTS))
        image_features, text_features = out["image_features"], out["text_features"]
        expected = torch.diagonal(image_features @ text_features.T).tolist()
    # With the package's preprocessing our scorer gives the package's scores.
    got = build_scorer("hpsv2", batch_size=2, preprocess="package", **src).score(images(), PROMPTS)
    assert got == pytest.approx(expected, abs=1e-5)
    # The default (open_clip's evaluation preprocessing, as the reference's scorer) gives the pixels of
    # that preprocessing written out, and the package's model code on those pixels gives its scores.
    ours = build_scorer("hpsv2", batch_size=2, **src)
    by_hand = torch.stack([open_clip_eval_pixels(im, IMAGE_SIZE) for im in images()])
    assert torch.allclose(torch.stack([ours.preprocess(im) for im in images()]), by_hand, rtol=0, atol=1e-6)
    with torch.no_grad():
        out = model(by_hand, tokenizer(PROMPTS))
    assert ours.score(images(), PROMPTS) == pytest.approx(
        torch.diagonal(out["image_features"] @ out["text_features"].T).tolist(), abs=1e-5)


def test_imagereward_checkpoint_missing_weights_is_refused(sources, tmp_path):
    from sdpo.errors import InputError

    src = dict(sources["imagereward"])
    state = torch.load(src["checkpoint"], weights_only=True)
    state["blip.text_encoder.extra.position_ids"] = torch.arange(3)  # an extra buffer is fine
    ok = str(tmp_path / "ok.pt")
    torch.save(state, ok)
    assert len(build_scorer("imagereward", **{**src, "checkpoint": ok}).score(images(2), PROMPTS[:2])) == 2
    broken = str(tmp_path / "broken.pt")
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, broken)
    with pytest.raises(InputError, match="lacks MLP-head weights"):
        build_scorer("imagereward", **{**src, "checkpoint": broken})
