"""Tiny random reward models, built offline, in the formats the real ones come in.

For the tests and the demo: the real loaders (transformers AutoModel/AutoProcessor, open_clip
with a registered config and a local checkpoint, the aesthetic MLP's .pth) on tiny random
weights. `build_tiny_scorers(folder)` returns the --source overrides that point every scorer at them.
"""

from __future__ import annotations

import json
import os

import torch

from sdpo.tiny import write_clip_tokenizer

IMAGE_SIZE = 32
OPEN_CLIP_ARCH = "tiny-ViT-sdpo"
OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _hf_clip(folder: str, seed: int, projection_dim: int = 32) -> str:
    """A tiny transformers CLIPModel with a CLIPProcessor (real CLIP tokenizer) in `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sdpo.tiny import load_clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(folder)
    write_clip_tokenizer(os.path.join(folder, "_tok"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=load_clip_tokenizer(os.path.join(folder, "_tok"))
                  ).save_pretrained(folder)
    import shutil

    shutil.rmtree(os.path.join(folder, "_tok"))
    return folder


def _open_clip(folder: str, name: str, seed: int, wrap: bool) -> str:
    import open_clip

    config_path = os.path.join(folder, f"{OPEN_CLIP_ARCH}.json")
    with open(config_path, "w") as f:
        json.dump(OPEN_CLIP_CONFIG, f)
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(OPEN_CLIP_ARCH, pretrained=None)
    path = os.path.join(folder, name)
    torch.save({"state_dict": model.state_dict()} if wrap else model.state_dict(), path)
    return path


def write_bert_vocab(folder: str) -> int:
    """A small WordPiece vocabulary (BERT's special tokens, some words, the letters); returns its size."""
    words = ["a", "an", "the", "of", "on", "in", "at", "cat", "dog", "red", "blue", "green", "house", "hill",
             "two", "boats", "photo", "tiny", "old", "robot", "boat", "car", "tree", "castle", "flower"]
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words,
                                *(chr(c) for c in range(ord("a"), ord("z") + 1))]))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, f)
    return len(vocab)


def _imagereward(folder: str, seed: int) -> dict[str, str]:
    """A tiny ImageReward checkpoint in the released layout (blip.visual_encoder.*, blip.text_encoder.*, mlp.*)."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    from eval.imagereward import CrossAttentionBert
    from eval.scorers import AestheticMLP

    tokenizer = os.path.join(folder, "imagereward-tokenizer")
    vocab = write_bert_vocab(tokenizer)
    med = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "vocab_size": vocab + 2, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
           "add_cross_attention": True, "pad_token_id": 0}
    med_path = os.path.join(folder, "imagereward-med_config.json")
    with open(med_path, "w") as f:
        json.dump(med, f)
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=IMAGE_SIZE, patch_size=8, embed_dim=48, depth=1, num_heads=2, qkv_bias=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0, global_pool="")
    text = CrossAttentionBert(**{**med, "encoder_width": 48})
    state = {**{f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()},
             **{f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()},
             **{f"mlp.{k}": v for k, v in AestheticMLP(32).state_dict().items()}}
    checkpoint = os.path.join(folder, "imagereward-tiny.pt")
    torch.save(state, checkpoint)
    return {"checkpoint": checkpoint, "med_config": med_path, "tokenizer": tokenizer, "vision_heads": "2"}


def build_tiny_scorers(folder: str) -> dict[str, dict[str, str]]:
    """Build (or reuse) every tiny scorer under `folder`; return the per-metric sources."""
    from eval.scorers import SCORERS, AestheticMLP

    os.makedirs(folder, exist_ok=True)
    done = os.path.join(folder, "sources.json")
    if os.path.isfile(done):
        with open(done) as f:
            sources = json.load(f)
        if set(sources) == set(SCORERS):  # built by this version: every metric there
            return sources
    pick = _hf_clip(os.path.join(folder, "pickscore"), seed=1)
    aes_clip = _hf_clip(os.path.join(folder, "aesthetics-clip"), seed=2, projection_dim=48)
    torch.manual_seed(3)
    mlp = os.path.join(folder, "aesthetic-mlp.pth")
    torch.save(AestheticMLP(48).state_dict(), mlp)
    config = os.path.join(folder, f"{OPEN_CLIP_ARCH}.json")
    hps = _open_clip(folder, "hps-tiny.pt", seed=4, wrap=True)
    clip = _open_clip(folder, "clip-tiny.pt", seed=5, wrap=False)
    sources = {
        "pickscore": {"model": pick, "processor": pick},
        "aesthetics": {"clip": aes_clip, "mlp": mlp},
        "hpsv2": {"arch": OPEN_CLIP_ARCH, "config": config, "checkpoint": hps},
        "clip": {"arch": OPEN_CLIP_ARCH, "config": config, "pretrained": clip},
        "imagereward": _imagereward(folder, seed=6),
    }
    with open(done, "w") as f:
        json.dump(sources, f, indent=2)
    return sources


def as_flags(sources: dict[str, dict[str, str]]) -> list[str]:
    """The sources as repeated `--source METRIC.FIELD=VALUE` flags."""
    return [x for metric, fields in sources.items() for k, v in fields.items() for x in ("--source", f"{metric}.{k}={v}")]
