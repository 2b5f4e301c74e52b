"""Each score equals its definition computed by hand from the model's embeddings (tiny random models)."""


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
    # The default (open_clip's preprocessing, as the reference) runs the same model code on its pixels.
    ours = build_scorer("hpsv2", batch_size=2, **src)
    with torch.no_grad():
        pixels = torch.stack([ours.preprocess(im) for im in images()])
        out = model(pixels, tokenizer(PROMPTS))
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
